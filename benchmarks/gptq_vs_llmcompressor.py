"""GPTQ side by side: tensorpress vs llm-compressor on the protocol (docs/protocol.md).

One command (after `make env peers assets`):

    .venv/bin/python benchmarks/gptq_vs_llmcompressor.py [--threads 2] [--bits 4 3]

Both tools get the same 128×512 calibration tokens (written once to a file), the same thread
count, and run one after the other, each in its own process (llm-compressor in .venv-peers, so its
pins do not constrain ours). Each reports compression wall time (calibration forwards + GPTQ, model
loading and evaluation excluded), peak RSS of its process, and protocol perplexity computed by the
same function (tensorpress.evaluate.perplexity) on the same 40×512 evaluation windows.
Results: benchmarks/results/gptq_vs_llmcompressor.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER = r'''
import json, os, resource, sys, time
import torch
from safetensors.torch import load_file
sys.path.insert(0, os.environ["TP_ROOT"])
from tensorpress.evaluate import perplexity
tool, bits, group, data, model_dir, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
torch.set_num_threads(threads)
tensors = load_file(data)
calib, windows = tensors["calib"], tensors["eval"]
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
t0 = time.perf_counter()
if tool == "tensorpress":
    from tensorpress.recipe import Recipe
    from tensorpress.compress.apply import compress_model
    recipe = Recipe.load(f"gptq-w{bits}g{group}")
    compress_model(model, recipe, calib, progress=False)
    settings = recipe.to_dict()["stages"][0]
else:
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    mod = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}})
    oneshot(model=model, dataset=ds, recipe=mod, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    settings = {"modifier": repr(mod)[:400]}
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ev = perplexity(model, windows, progress=False)
print("RESULT " + json.dumps({"tool": tool, "bits": bits, "group_size": group, "compress_seconds": round(seconds, 1),
      "peak_rss_mb": round(peak / 2**20), "threads": threads, **ev, "settings": settings}))
'''


def run_worker(python: str, tool: str, bits: int, group: int, data: Path, model_dir: Path, threads: int) -> dict:
    from _common import run_worker as _run, worker_env
    return _run(f"{tool} w{bits}g{group}", [python, "-c", WORKER, tool, str(bits), str(group), str(data), str(model_dir),
                                            str(threads)], worker_env(ROOT, threads), Path(data).parent)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--peers-python", default=os.environ.get("TENSORPRESS_PEERS_PYTHON", str(ROOT / ".venv-peers/bin/python")))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if not Path(a.peers_python).exists():
        print(f"error: peers environment not found at {a.peers_python} (run `make peers`)", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer
    from tensorpress import __version__, assets
    from tensorpress.evaluate import perplexity
    from _common import write_tokens

    torch.set_num_threads(a.threads)
    model_dir = assets.default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    data, windows = write_tokens(Path(tempfile.mkdtemp()), tok, a.samples, a.seq_len, a.eval_windows)

    from transformers import AutoModelForCausalLM
    dense = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), windows,
                       progress=False)
    rows = [{"tool": "dense", "bits": 32, **dense}]
    for bits in a.bits:
        for tool, py in (("tensorpress", sys.executable), ("llm-compressor", a.peers_python)):
            print(f"running {tool} w{bits}g{a.group_size} ...", file=sys.stderr, flush=True)
            rows.append(run_worker(py, tool, bits, a.group_size, data, model_dir, a.threads))
            print(f"  ppl {rows[-1]['ppl']:.3f}  {rows[-1]['compress_seconds']} s", file=sys.stderr, flush=True)

    peers_ver = subprocess.run([a.peers_python, "-c", "import importlib.metadata as m; print(m.version('llmcompressor'), "
                                "m.version('compressed-tensors'), m.version('transformers'))"],
                               capture_output=True, text=True).stdout.split()
    import transformers
    from _common import machine, public_args
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
            "command": "python benchmarks/gptq_vs_llmcompressor.py " + " ".join(public_args(sys.argv[1:])),
            "protocol": {"calibration": [a.samples, a.seq_len], "eval_windows": [a.eval_windows, 512]},
            "versions": {"tensorpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "llmcompressor": peers_ver[0] if peers_ver else None,
                         "compressed-tensors": peers_ver[1] if len(peers_ver) > 1 else None,
                         "peer transformers": peers_ver[2] if len(peers_ver) > 2 else None}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gptq_vs_llmcompressor.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"GPTQ w{{3,4}}g{a.group_size}, SmolLM2-135M protocol — {meta['date']}, {meta['machine']}, "
             f"{a.threads} threads", "", "| tool | bits | ppl | compress s | peak RSS MB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['bits']} | {r['ppl']:.3f} | {r.get('compress_seconds', '-')} | "
                     f"{r.get('peak_rss_mb', '-')} |")
    lines += ["", f"command: `{meta['command']}`", f"versions: {json.dumps(meta['versions'])}"]
    (out / "gptq_vs_llmcompressor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
