"""Calibration and evaluation token samples.

The protocol (docs/protocol.md): the Wikipedia text tokenised without special tokens; the first 90 %
of the tokens is the calibration pool, the last 10 % the evaluation split; calibration = the first
``n`` non-overlapping ``seq_len`` chunks of the pool; evaluation = the first ``n`` windows of the split.

Users may bring their own calibration data instead (:func:`load_calibration`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import TensorpressError

CALIB_FRACTION = 0.9


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def protocol_tokens(tokenizer) -> torch.Tensor:
    """All tokens of the protocol text, cached per tokenizer in the asset cache."""
    from safetensors.torch import load_file, save_file
    from .. import assets

    path = assets.cache_dir() / f"wiki-tokens-{_tokenizer_key(tokenizer)}.safetensors"
    if path.exists():
        return load_file(path)["ids"]
    ids = encode(tokenizer, assets.wiki_text())
    tmp = path.with_suffix(".partial")
    save_file({"ids": ids}, tmp)
    tmp.replace(path)
    return ids


def protocol_split(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids = protocol_tokens(tokenizer)
    cut = int(len(ids) * CALIB_FRACTION)
    return ids[:cut], ids[cut:]


def chunk(ids: torch.Tensor, n: int, seq_len: int, seed: int | None = None, what: str = "samples") -> torch.Tensor:
    """``n`` non-overlapping ``seq_len`` windows of a 1-D token stream: the first ``n`` when
    ``seed`` is None (the protocol), otherwise ``n`` windows drawn without replacement."""
    if n < 1 or seq_len < 2:
        raise TensorpressError(f"need at least 1 sample of at least 2 tokens, got {n} x {seq_len}")
    total = len(ids) // seq_len
    if total < n:
        raise TensorpressError(f"not enough tokens for {n} {what} of {seq_len} tokens "
                               f"({len(ids)} tokens give {total})")
    windows = ids[: total * seq_len].view(total, seq_len)
    if seed is None:
        return windows[:n].clone()
    g = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(total, generator=g)[:n]].clone()


def calibration_samples(tokenizer, n: int = 128, seq_len: int = 512, seed: int | None = None) -> torch.Tensor:
    return chunk(protocol_split(tokenizer)[0], n, seq_len, seed, "calibration samples")


def eval_windows(tokenizer, n: int = 40, seq_len: int = 512) -> torch.Tensor:
    return chunk(protocol_split(tokenizer)[1], n, seq_len, None, "evaluation windows")


def _texts_from_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TensorpressError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise TensorpressError(f"{path}:{i}: each line must be an object with a string 'text' field")
                texts.append(rec["text"])
        return texts
    return [path.read_text(encoding="utf-8", errors="replace")]


def _tokens_from_dataset_dir(path: Path, tokenizer) -> torch.Tensor:
    try:
        import datasets
    except ImportError:
        raise TensorpressError(f"{path} looks like a `datasets` directory but `datasets` is not installed") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if "input_ids" in ds.column_names:
        return torch.cat([torch.as_tensor(r, dtype=torch.long) for r in ds["input_ids"]])
    if "text" in ds.column_names:
        return encode(tokenizer, "\n\n".join(ds["text"]))
    raise TensorpressError(f"dataset at {path} has neither an 'input_ids' nor a 'text' column")


def load_calibration(source, tokenizer=None, n: int = 128, seq_len: int = 512, seed: int | None = None) -> torch.Tensor:
    """Calibration token windows ``[n, seq_len]`` from user data.

    ``source`` may be: a LongTensor ``[n, L]`` (used as is) or 1-D (chunked); a list of strings; a
    path to a ``.txt`` file, a ``.jsonl`` file (``{"text": ...}`` per line), a ``.safetensors`` /
    ``.npy`` file of token ids, or a directory saved by ``datasets.Dataset.save_to_disk``.
    Text is joined with blank lines and tokenised without special tokens, like the protocol text.
    """
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.int32, torch.int64):
            raise TensorpressError("calibration token tensors must hold integer ids")
        if source.dim() == 2:
            return source.long()[:n]
        return chunk(source.long().flatten(), n, seq_len, seed)
    if isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        if tokenizer is None:
            raise TensorpressError("a tokenizer is needed to use text as calibration data")
        return chunk(encode(tokenizer, "\n\n".join(source)), n, seq_len, seed)
    path = Path(source)
    if not path.exists():
        raise TensorpressError(f"calibration data {path} does not exist")
    if path.is_dir():
        return chunk(_tokens_from_dataset_dir(path, tokenizer), n, seq_len, seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        t = load_file(path)
        return load_calibration(t.get("input_ids", next(iter(t.values()))), tokenizer, n, seq_len, seed)
    if path.suffix == ".npy":
        import numpy as np
        return load_calibration(torch.from_numpy(np.load(path, allow_pickle=False)), tokenizer, n, seq_len, seed)
    if tokenizer is None:
        raise TensorpressError("a tokenizer is needed to use text as calibration data")
    return chunk(encode(tokenizer, "\n\n".join(_texts_from_file(path))), n, seq_len, seed)


def batches(samples: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for i in range(0, len(samples), batch_size):
        yield samples[i:i + batch_size]
