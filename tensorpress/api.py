"""High-level calls shared by the CLI and the Python API: evaluation reports and the one-shot
compress → evaluate → save job."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .errors import TensorpressError
from .evaluate import bits_per_weight, model_bytes, peak_rss_bytes, perplexity

PROTOCOL = {"eval_windows": 40, "seq_len": 512}


def evaluate(model, tokenizer, windows: int = PROTOCOL["eval_windows"], seq_len: int = PROTOCOL["seq_len"],
             batch_size: int = 4, progress: bool = True, cache_key: str | None = None) -> dict:
    """Protocol perplexity on the evaluation split plus size accounting (docs/protocol.md)."""
    from .calib.data import eval_windows
    if tokenizer is None:
        raise TensorpressError("the model has no tokenizer; evaluation needs one")
    cached = _cache_get(cache_key, windows, seq_len)
    if cached is None:
        ids = eval_windows(tokenizer, windows, seq_len)
        t0 = time.perf_counter()
        cached = perplexity(model, ids, batch_size=batch_size, progress=progress)
        cached["eval_seconds"] = round(time.perf_counter() - t0, 2)
        _cache_put(cache_key, windows, seq_len, cached)
    bpw = bits_per_weight(model)
    return {**cached, "eval_windows": windows, "seq_len": seq_len, "model_bytes": model_bytes(model),
            "bits_per_weight": bpw["bits_per_weight"], "compressed_linears": bpw["compressed_linears"],
            "threads": torch.get_num_threads()}


def _cache_file(key, windows, seq_len):
    from . import assets
    return assets.cache_dir() / "ppl-cache" / f"{key}-{windows}x{seq_len}.json"


def _cache_get(key, windows, seq_len):
    if key is None:
        return None
    p = _cache_file(key, windows, seq_len)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cache_put(key, windows, seq_len, value):
    if key is None:
        return
    p = _cache_file(key, windows, seq_len)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".partial")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, p)


def dense_cache_key(model_dir: Path) -> str | None:
    """A stable key for the dense perplexity of a model directory (the default asset's checksum)."""
    marker = Path(model_dir) / "tensorpress-asset.json"
    try:
        return "dense-" + json.loads(marker.read_text())["sha256"][:16]
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def format_table(rows: list[dict]) -> str:
    cols = [("model", "{}"), ("ppl", "{:.3f}"), ("scored tokens", "{}"), ("size MB", "{:.1f}"),
            ("bits/weight", "{:.3f}"), ("compress s", "{}"), ("peak RSS MB", "{}"), ("threads", "{}")]
    keys = ["label", "ppl", "scored_tokens", "model_mb", "bits_per_weight", "compress_seconds", "peak_rss_mb", "threads"]
    cells = [[h for h, _ in cols]]
    for r in rows:
        line = []
        for (h, f), k in zip(cols, keys):
            v = r.get(k)
            line.append("-" if v is None else (f.format(v) if not isinstance(v, str) else v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    fmt = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(c) for c in cells[1:]])
