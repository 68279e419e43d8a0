"""The low-rank family on the protocol (docs/protocol.md), side by side with GPTQModel's GPTQ + EoRA.

One command (after `make env peers assets`)::

    .venv/bin/python benchmarks/lowrank.py [--threads 2] [--rows ROW ...] [--reuse]

Rows (each in its own process, the same 128×512 calibration tokens and 40×512 evaluation windows,
written once to a file, and the same thread count):

* GPTQ w4g64 alone, + EoRA r32 / r64, + a plain-SVD correction r32; the same at 3 bits (w3g64 and
  w3g64 + EoRA r32), because the default model's weights came from a 4-bit GGUF file;
* GPTQModel 7.6.0 GPTQ w4g64 alone and + its EoRA r32 (in `.venv-peers`, bf16 as its CPU path needs;
  evaluated with its weights and adapter upcast to fp32);
* plain SVD, SVD-LLM (W), ASVD and FWSVD at p80 and p50 (fraction of parameters kept), and SVD-LLM
  p80 with the measured-sensitivity allocation of one global budget.

Each row reports protocol perplexity, bits per weight of the decoder linears (scales, zeros and
factors counted), model bytes, compression wall time and CPU time (model loading and evaluation
excluded; FWSVD's Fisher backward passes included), and peak RSS of its process. Row results are
kept in ``benchmarks/results/lowrank_rows/`` (``--reuse`` keeps rows already there, so a long run
can be finished in parts); the table and checks go to ``benchmarks/results/lowrank.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

from _common import fmt, machine, public_args, run_rows, run_worker, worker_env, write_tokens  # noqa: E402

# name -> (kind, arg): kind "tp" runs a shipped recipe, "gptqmodel" the peer with (bits, group, rank)
ROWS = {
    "gptq-w4g64": ("tp", "gptq-w4g64"),
    "gptq-w4g64+eora-r32": ("tp", "gptq-w4g64+eora-r32"),
    "gptq-w4g64+eora-r64": ("tp", "gptq-w4g64+eora-r64"),
    "gptq-w4g64+svd-r32": ("tp", "gptq-w4g64+svd-r32"),
    "gptqmodel-w4g64": ("gptqmodel", (4, 64, 0)),
    "gptqmodel-w4g64+eora-r32": ("gptqmodel", (4, 64, 32)),
    "gptq-w3g64": ("tp", "gptq-w3g64"),
    "gptq-w3g64+eora-r32": ("tp", "gptq-w3g64+eora-r32"),
    "svd-p80": ("tp", "svd-p80"),
    "svdllm-p80": ("tp", "svdllm-p80"),
    "asvd-p80": ("tp", "asvd-p80"),
    "fwsvd-p80": ("tp", "fwsvd-p80"),
    "svdllm-p80-sensitivity": ("tp", "svdllm-p80-sensitivity"),
    "svd-p50": ("tp", "svd-p50"),
    "svdllm-p50": ("tp", "svdllm-p50"),
    "asvd-p50": ("tp", "asvd-p50"),
    "fwsvd-p50": ("tp", "fwsvd-p50"),
}

WORKER = r'''
import json, os, resource, sys, time
import torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, os.environ["TP_ROOT"])
from tensorpress.evaluate import bits_per_weight, model_bytes, perplexity
from tensorpress.recipe import Recipe
from tensorpress.compress.apply import compress_model
from tensorpress.calib.collectors import collect_fisher
from tensorpress.modeling import decoder_layers, layers_prefix, target_linears
name, recipe_name, data, model_dir, threads, work = sys.argv[1:7]
torch.set_num_threads(int(threads))
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t = load_file(data)
calib, windows = t["calib"], t["eval"]
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
recipe = Recipe.load(recipe_name)
fisher, fisher_s, fisher_cpu = None, 0.0, 0.0
if any("fisher" in s.compressor.requires for s in recipe.stages):
    # The Fisher depends on the dense model and the calibration tokens only: computed once per run
    # of the benchmark and shared by the FWSVD rows; its time is added to each row's.
    cache = os.path.join(work, "fisher.safetensors")
    prefix = layers_prefix(model)
    mods = {f"{prefix}.{i}.{n}": m for i, l in enumerate(decoder_layers(model)) for n, m in target_linears(l).items()}
    if os.path.exists(cache):
        ft = load_file(cache)
        meta = json.load(open(cache + ".json"))
        fisher_s, fisher_cpu = meta["seconds"], meta["cpu_seconds"]
        from tensorpress.calib.collectors import LinearStats
        fisher = {}
        for n, m in mods.items():
            st = LinearStats(m.in_features)
            st.fisher_in, st.fisher_out = ft[n + ".in"], ft[n + ".out"]
            fisher[n] = st
    else:
        t0, c0 = time.perf_counter(), cpu()
        fisher = collect_fisher(model, calib, mods, progress=False)
        fisher_s, fisher_cpu = time.perf_counter() - t0, cpu() - c0
        flat = {}
        for n, st in fisher.items():
            flat[n + ".in"], flat[n + ".out"] = st.fisher_in.contiguous(), st.fisher_out.contiguous()
        save_file(flat, cache)
        json.dump({"seconds": fisher_s, "cpu_seconds": fisher_cpu}, open(cache + ".json", "w"))
t0, c0 = time.perf_counter(), cpu()
records = compress_model(model, recipe, calib, progress=False, fisher=fisher)
seconds, cpu_s = time.perf_counter() - t0 + fisher_s, cpu() - c0 + fisher_cpu
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ev = perplexity(model, windows, progress=False)
bpw = bits_per_weight(model)
ranks = sorted({r.module.get("rank") or r.module.get("factor_rank") for r in records} - {None, 0})
print("RESULT " + json.dumps({"row": name, "tool": "tensorpress", "recipe": recipe.to_dict(),
      "compress_seconds": round(seconds, 1), "compress_cpu_seconds": round(cpu_s, 1),
      "fisher_seconds": round(fisher_s, 1), "peak_rss_mb": round(peak / 2**20), "threads": int(threads),
      "bits_per_weight": bpw["bits_per_weight"], "model_bytes": model_bytes(model), "ranks": ranks[:3] + (["..."] if len(ranks) > 3 else []),
      "mean_rel_error": sum(r.rel_error for r in records) / len(records), **ev}))
'''


def run_row(name: str, data: Path, model_dir: Path, threads: int, peers_python: str, work: Path) -> dict:
    kind, arg = ROWS[name]
    env = worker_env(ROOT, threads, GPTQMODEL_CPU_WORKERS="2")
    if kind == "tp":
        cmd = [sys.executable, "-c", WORKER, name, arg, str(data), str(model_dir), str(threads), str(work)]
    else:
        bits, group, rank = arg
        out = work / f"{name}.json"
        cmd = [peers_python, str(ROOT / "benchmarks" / "peers" / "gptqmodel_eora.py"), str(data), str(model_dir),
               str(out), "--bits", str(bits), "--group-size", str(group), "--rank", str(rank), "--threads",
               str(threads)]
    res = run_worker(name, cmd, env, work)
    res["row"] = name
    return res


def table(rows: list[dict]) -> list[str]:
    out = ["| row | tool | ppl | bits/weight | MB | compress s | CPU s | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['row']} | {r.get('tool', '')} | {r['ppl']:.3f} | {fmt(r.get('bits_per_weight'), '{:.2f}')} | "
                   f"{fmt(r.get('model_bytes') and r['model_bytes'] / 2**20, '{:.1f}')} | "
                   f"{fmt(r.get('compress_seconds'), '{}')} | {fmt(r.get('compress_cpu_seconds'), '{}')} | "
                   f"{fmt(r.get('peak_rss_mb'), '{}')} |")
    return out


def checks(by: dict) -> list[tuple[str, bool | None]]:
    def lt(a, b, key="ppl"):
        if a not in by or b not in by:
            return None
        return by[a][key] < by[b][key]
    return [
        ("EoRA r32 beats the plain-SVD correction r32 (ppl)", lt("gptq-w4g64+eora-r32", "gptq-w4g64+svd-r32")),
        ("EoRA r32 improves on GPTQ w4g64 alone (ppl)", lt("gptq-w4g64+eora-r32", "gptq-w4g64")),
        ("w4g64: ppl no worse than GPTQModel GPTQ",
         None if "gptqmodel-w4g64" not in by or "gptq-w4g64" not in by else
         by["gptq-w4g64"]["ppl"] <= by["gptqmodel-w4g64"]["ppl"]),
        ("w4g64+r32: ppl no worse than GPTQModel GPTQ + EoRA r32",
         None if "gptqmodel-w4g64+eora-r32" not in by or "gptq-w4g64+eora-r32" not in by else
         by["gptq-w4g64+eora-r32"]["ppl"] <= by["gptqmodel-w4g64+eora-r32"]["ppl"]),
        ("w4g64+r32: less compression wall time than GPTQModel",
         lt("gptq-w4g64+eora-r32", "gptqmodel-w4g64+eora-r32", "compress_seconds")),
        ("w4g64+r32: less peak memory than GPTQModel", lt("gptq-w4g64+eora-r32", "gptqmodel-w4g64+eora-r32", "peak_rss_mb")),
        ("3-bit: EoRA r32 improves on GPTQ w3g64 alone (ppl)", lt("gptq-w3g64+eora-r32", "gptq-w3g64")),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--reuse", action="store_true", help="keep rows already in benchmarks/results/lowrank_rows/")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from the stored rows")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    ap.add_argument("--work", help="scratch directory (token file, shared Fisher); default: a new temp dir")
    ap.add_argument("--peers-python", default=os.environ.get("TENSORPRESS_PEERS_PYTHON", str(ROOT / ".venv-peers/bin/python")))
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tensorpress import __version__, assets
    from tensorpress.evaluate import perplexity

    results = Path(a.out)
    rows_dir = results / "lowrank_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    model_dir = assets.default_model_dir()
    work = Path(a.work or tempfile.mkdtemp(prefix="tp-lowrank-"))
    work.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        if any(ROWS[r][0] == "gptqmodel" for r in a.rows) and not Path(a.peers_python).exists():
            print(f"error: peers environment not found at {a.peers_python} (run `make peers`)", file=sys.stderr)
            return 2
        tok = AutoTokenizer.from_pretrained(model_dir)
        data, windows = write_tokens(work, tok, a.samples, a.seq_len, a.eval_windows)
        dense_file = rows_dir / "dense.json"
        if not (a.reuse and dense_file.exists()):
            dense = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), windows,
                               progress=False)
            dense_file.write_text(json.dumps({"row": "dense", "tool": "dense fp32", "bits_per_weight": 32.0, **dense}))
        run_rows(a.rows, rows_dir, lambda name: run_row(name, data, model_dir, a.threads, a.peers_python, work),
                 reuse=a.reuse)

    order = ["dense"] + list(ROWS)
    rows = [json.loads((rows_dir / f"{n}.json").read_text()) for n in order if (rows_dir / f"{n}.json").exists()]
    by = {r["row"]: r for r in rows}
    import transformers
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
            "command": "python benchmarks/lowrank.py " + " ".join(public_args(sys.argv[1:])),
            "protocol": {"calibration": [a.samples, a.seq_len], "eval_windows": [a.eval_windows, 512]},
            "versions": {"tensorpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "peer": next((r.get("versions") for r in rows if r.get("versions")), None)}}
    chk = checks(by)
    (results / "lowrank.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                     "checks": [{"check": c, "ok": ok} for c, ok in chk]}, indent=2))
    lines = [f"Low-rank family, SmolLM2-135M protocol — {meta['date']}, {meta['machine']}, {a.threads} threads", ""]
    lines += table(rows)
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {c} | {'yes' if ok else ('no' if ok is False else 'not run')} |" for c, ok in chk]
    lines += ["", f"command: `{meta['command']}` (rows stored per row; each row's date is in its JSON)",
              f"versions: {json.dumps(meta['versions'])}",
              "bits/weight: stored bits of the decoder linears per weight (EoRA factors in fp16, SVD factors in fp32).",
              "compress s / CPU s: compression only (loading and evaluation excluded), FWSVD's Fisher included."]
    (results / "lowrank.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
