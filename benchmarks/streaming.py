"""Larger than memory: stream-compress synthetic Llama-style models of two depths and report peak
resident memory against the model's fp32 size (memory must stay flat in depth).

    python benchmarks/streaming.py [--layers 24 120] [--hidden 1024] [--intermediate 2816] [--threads 2]

The default shapes are deep and narrow on purpose: what one block costs (its weights, its Gram
statistics — the largest is intermediate² in fp64 — and GPTQ's work on it) is what the run holds,
so a model with many small blocks is where "larger than memory" can be shown on a 24 GB machine.

Each model (random weights, std 0.02, one safetensors shard per block, written block by block so
that generating it needs one block of memory) is compressed by ``tensorpress compress --stream`` in
its own process, with random calibration token ids; peak RSS is that process's own ``ru_maxrss``.
Writes ``benchmarks/results/streaming.json`` and ``streaming.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_model(d: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv: int, seed: int) -> int:
    """Write a random Llama model to ``d`` one block at a time; returns its fp32 weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from accelerate import init_empty_weights
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    with init_empty_weights():
        skel = LlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in skel.state_dict().items()}
    d.mkdir(parents=True)
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(seed)
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    weight_map, total = {}, 0
    for j, keys in enumerate(groups):
        name = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for k in keys:
            t = torch.ones(shapes[k]) if k.endswith("norm.weight") else torch.randn(shapes[k], generator=g) * 0.02
            part[k] = t
            total += t.numel() * 4
            weight_map[k] = name
        save_file(part, d / name, metadata={"format": "pt"})
        del part
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    return total


def run_one(work: Path, layers: int, a) -> dict:
    import torch
    from safetensors.torch import save_file
    d = work / f"llama-{layers}l"
    t0 = time.perf_counter()
    size = make_model(d, layers, a.hidden, a.intermediate, a.vocab, a.heads, a.kv_heads, a.seed)
    gen_s = time.perf_counter() - t0
    ids = torch.randint(0, a.vocab, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(a.seed))
    save_file({"ids": ids}, work / "calib.safetensors")
    out = work / f"out-{layers}l"
    cmd = [sys.executable, "-m", "tensorpress.cli", "compress", str(d), "-r", a.recipe, "-o", str(out),
           "--calib", str(work / "calib.safetensors"), "--stream", "--no-eval", "--json", "-q",
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    if a.activation_budget is not None:
        cmd += ["--activation-budget", str(a.activation_budget)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    stdout, stderr = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"layers={layers}: compress failed:\n{stderr.decode()[-3000:]}")
    report = json.loads(stdout)
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(d)
    shutil.rmtree(out)
    return {"layers": layers, "fp32_weights_mb": round(size / 2**20), "peak_rss_mb": report["peak_rss_mb"],
            "ratio": round(size / 2**20 / report["peak_rss_mb"], 2), "compress_s": report["compress_seconds"],
            "wall_s": round(wall, 1), "generate_s": round(gen_s, 1), "checkpoint_mb": round(out_bytes / 2**20)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[24, 120])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--recipe", default="gptq-w4g64")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--activation-budget", type=float, default=8.0, help="MB of activations kept in memory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--note", action="append", default=[], help="a line added to the report (e.g. run conditions)")
    a = ap.parse_args()
    # The child reports its own peak RSS (ru_maxrss of its process), so nothing here inflates it.
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="tp-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in a.layers:
        print(f"layers={n} ...", flush=True)
        rows.append(run_one(work, n, a))
        print("  ", rows[-1], flush=True)
    import torch
    import transformers
    machine = (f"{platform.machine()} {os.cpu_count()} cores ({platform.platform()}), {a.threads} threads")
    big, small = max(rows, key=lambda r: r["layers"]), min(rows, key=lambda r: r["layers"])
    checks = [("largest model's fp32 weights ≥ 3× the run's peak RSS", f"{big['ratio']}×", big["ratio"] >= 3),
              (f"peak RSS flat in depth ({small['layers']} → {big['layers']} layers: within 10 %)",
               f"{small['peak_rss_mb']} → {big['peak_rss_mb']} MB", big["peak_rss_mb"] <= 1.1 * small["peak_rss_mb"])]
    argv = list(sys.argv[1:])
    for flag in ("--work", "--out"):                 # scratch and output paths are the machine's own
        if flag in argv and argv.index(flag) + 1 < len(argv):
            argv[argv.index(flag) + 1] = "DIR"
    cmd = "python benchmarks/streaming.py " + " ".join(argv)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "command": cmd.strip(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "model": {"family": "llama (random weights)", "hidden": a.hidden, "intermediate": a.intermediate,
                     "heads": a.heads, "kv_heads": a.kv_heads, "vocab": a.vocab},
           "recipe": a.recipe, "calibration": [a.samples, a.seq_len], "activation_budget_mb": a.activation_budget,
           "rows": rows, "notes": a.note, "checks": [{"check": c, "value": v, "pass": bool(p)} for c, v, p in checks]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming.json").write_text(json.dumps(res, indent=2))
    lines = [f"Streaming compression (`--stream`), synthetic Llama {a.hidden}/{a.intermediate}, GQA {a.heads}/{a.kv_heads}, "
             f"vocab {a.vocab}, recipe `{a.recipe}`, calibration {a.samples}×{a.seq_len} random ids, activation budget "
             f"{a.activation_budget} MB — {res['date']}, {machine}", "",
             "| layers | fp32 weights MB | peak RSS MB | weights / peak | compress s | checkpoint MB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['fp32_weights_mb']} | {r['peak_rss_mb']} | {r['ratio']}× | {r['compress_s']} | "
              f"{r['checkpoint_mb']} |" for r in rows]
    lines += ["", "| check | value | result |", "|---|---|---|"]
    lines += [f"| {c} | {v} | {'yes' if p else 'no'} |" for c, v, p in checks]
    lines += ["", f"command: `{cmd.strip()}`; peak RSS is the compressing process's own maximum resident set "
              "(ru_maxrss), model loading included; it is measured, not enforced by a limit."]
    lines += [f"note: {n}" for n in a.note]
    (out / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
