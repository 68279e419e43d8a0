"""SVDQuant on the protocol (docs/protocol.md): W4A16 / W4A8 / W4A4 at rank 32 against plain W4A4, the
paper's ablations (no branch, no smoothing) and the weight-only 4-bit baselines at the same bits and rank.

One command (after `make env assets`)::

    .venv/bin/python benchmarks/svdquant.py [--threads 2] [--rows ROW ...] [--reuse] [--baselines-from-results]

Rows (each in its own process, the same 128×512 calibration tokens and 40×512 evaluation windows,
written once to a file, and the same thread count), all shipped recipes:

* ``svdquant-w4a16-r32``, ``svdquant-w4a8-r32``, ``svdquant-w4a4-r32`` — SVDQuant at the three
  activation settings (W4A4's activations are fake-quantised on CPU: accuracy, not speed);
* ``rtn-w4a4`` — plain W4A4 (no smoothing, no branch); ``smooth-w4a4`` — smoothing only (no branch);
  ``svdquant-w4a4-r32-nosmooth`` — branch without smoothing (the paper's ablation);
* ``rtn-w4g64``, ``gptq-w4g64``, ``gptq-w4g64+eora-r32`` — weight-only baselines at 4 bits, group 64,
  rank 32;
* the 3-bit setting beside it (the default model's weights came from a 4-bit GGUF file, which can
  flatter 4-bit results): ``svdquant-w3a16-r32`` against ``rtn-w3g64``, ``gptq-w3g64``,
  ``gptq-w3g64+eora-r32``.

``--baselines-from-results`` copies the six weight-only baselines from the low-rank and comparison
benchmarks' stored rows (the same protocol, tokens and worker code path) instead of re-running them.

Each row reports protocol perplexity, bits per weight of the decoder linears (scales, zeros, smoothing
vectors and fp16 factors counted), model bytes, compression wall and CPU time (loading and evaluation
excluded), peak RSS and the mean per-linear relative output error. Rows are kept in
``<out>/svdquant_rows/`` (``--reuse`` keeps rows already there); the table and checks go to
``<out>/svdquant.{json,md}`` (``--out`` defaults to ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

ROWS = [
    "svdquant-w4a16-r32", "svdquant-w4a8-r32", "svdquant-w4a4-r32",
    "rtn-w4a4", "smooth-w4a4", "svdquant-w4a4-r32-nosmooth",
    "rtn-w4g64", "gptq-w4g64", "gptq-w4g64+eora-r32",
    "svdquant-w3a16-r32", "rtn-w3g64", "gptq-w3g64", "gptq-w3g64+eora-r32",
]
# Weight-only baselines the other benchmarks already run on the same protocol with the same worker
# code path (--baselines-from-results copies them instead of re-running).
BASELINES = ("rtn-w4g64", "gptq-w4g64", "gptq-w4g64+eora-r32", "rtn-w3g64", "gptq-w3g64", "gptq-w3g64+eora-r32")
BASELINE_DIRS = ("lowrank_rows", "compare_rows")

WORKER = r'''
import json, os, resource, sys, time
import torch
from safetensors.torch import load_file
sys.path.insert(0, os.environ["TP_ROOT"])
from tensorpress.evaluate import bits_per_weight, model_bytes, perplexity
from tensorpress.recipe import Recipe
from tensorpress.compress.apply import compress_model
name, data, model_dir, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t = load_file(data)
calib, windows = t["calib"], t["eval"]
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
recipe = Recipe.load(name)
t0, c0 = time.perf_counter(), cpu()
records = compress_model(model, recipe, calib, progress=False)
seconds, cpu_s = time.perf_counter() - t0, cpu() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ev = perplexity(model, windows, progress=False)
bpw = bits_per_weight(model)
st = recipe.stages[0].compressor.params
print("RESULT " + json.dumps({"row": name, "tool": "tensorpress", "recipe": recipe.to_dict(),
      "act_bits": getattr(st, "act_bits", 16), "compress_seconds": round(seconds, 1),
      "compress_cpu_seconds": round(cpu_s, 1), "peak_rss_mb": round(peak / 2**20), "threads": int(threads),
      "bits_per_weight": bpw["bits_per_weight"], "model_bytes": model_bytes(model),
      "mean_rel_error": sum(r.rel_error for r in records) / len(records), **ev}))
'''


def run_row(name: str, data: Path, model_dir: Path, threads: int, work: Path) -> dict:
    from _common import run_worker, worker_env
    return run_worker(name, [sys.executable, "-c", WORKER, name, str(data), str(model_dir), str(threads)],
                      worker_env(ROOT, threads), work)


def table(rows: list[dict]) -> list[str]:
    from _common import fmt
    out = ["| row | act bits | ppl | bits/weight | MB | compress s | CPU s | peak RSS MB | mean rel. error |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['row']} | {r.get('act_bits', '-')} | {r['ppl']:.3f} | {fmt(r.get('bits_per_weight'), '{:.2f}')} | "
                   f"{fmt(r.get('model_bytes') and r['model_bytes'] / 2**20, '{:.1f}')} | "
                   f"{fmt(r.get('compress_seconds'), '{}')} | {fmt(r.get('compress_cpu_seconds'), '{}')} | "
                   f"{fmt(r.get('peak_rss_mb'), '{}')} | {fmt(r.get('mean_rel_error'), '{:.4f}')} |")
    return out


def checks(by: dict) -> list[tuple[str, bool | None]]:
    def lt(a, b, factor=1.0):
        if a not in by or b not in by:
            return None
        return by[a]["ppl"] * factor < by[b]["ppl"]
    return [
        ("SVDQuant W4A4 r32 far better than plain W4A4 (ppl at least 2x lower)", lt("svdquant-w4a4-r32", "rtn-w4a4", 2.0)),
        ("SVDQuant W4A4 r32 better than smoothing only (no branch)", lt("svdquant-w4a4-r32", "smooth-w4a4")),
        ("SVDQuant W4A4 r32 better than the branch without smoothing", lt("svdquant-w4a4-r32", "svdquant-w4a4-r32-nosmooth")),
        ("smoothing only better than plain W4A4", lt("smooth-w4a4", "rtn-w4a4")),
        ("SVDQuant W4A8 r32 better than SVDQuant W4A4 r32", lt("svdquant-w4a8-r32", "svdquant-w4a4-r32")),
        ("SVDQuant W4A16 r32 better than RTN w4g64", lt("svdquant-w4a16-r32", "rtn-w4g64")),
        ("SVDQuant W4A16 r32 vs GPTQ w4g64 + EoRA r32 (same bits and rank)", lt("svdquant-w4a16-r32", "gptq-w4g64+eora-r32")),
        ("SVDQuant W3A16 r32 better than RTN w3g64", lt("svdquant-w3a16-r32", "rtn-w3g64")),
        ("SVDQuant W3A16 r32 vs GPTQ w3g64 + EoRA r32 (same bits and rank)", lt("svdquant-w3a16-r32", "gptq-w3g64+eora-r32")),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    ap.add_argument("--reuse", action="store_true", help="keep rows already in <out>/svdquant_rows/")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from the stored rows")
    ap.add_argument("--baselines-from-results", action="store_true",
                    help=f"copy {', '.join(BASELINES)} from benchmarks/results/{{{','.join(BASELINE_DIRS)}}}/ "
                         "(same protocol and worker code path) instead of running them")
    ap.add_argument("--note", action="append", default=[], help="a line added to the report (e.g. run conditions)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    ap.add_argument("--work", help="scratch directory (token file); default: a new temp dir")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from _common import DIR_ARGS, machine, public_args, run_rows, stored_row, write_tokens
    from tensorpress import __version__, assets
    from tensorpress.evaluate import perplexity

    results = Path(a.out)
    rows_dir = results / "svdquant_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    model_dir = assets.default_model_dir()
    work = Path(a.work or tempfile.mkdtemp(prefix="tp-svdquant-"))
    work.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        if a.baselines_from_results and (a.samples, a.seq_len, a.eval_windows) != (128, 512, 40):
            print("error: --baselines-from-results needs the default protocol (the copied rows ran on it)",
                  file=sys.stderr)
            return 2
        tok = AutoTokenizer.from_pretrained(model_dir)
        data, windows = write_tokens(work, tok, a.samples, a.seq_len, a.eval_windows)
        dense_file = rows_dir / "dense.json"
        if not (a.reuse and dense_file.exists()):
            dense = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), windows,
                               progress=False)
            dense_file.write_text(json.dumps({"row": "dense", "tool": "dense fp32", "bits_per_weight": 32.0, **dense}))

        def baseline(name):
            if not (a.baselines_from_results and name in BASELINES):
                return None
            return stored_row(RESULTS, name, BASELINE_DIRS)

        run_rows(a.rows, rows_dir, lambda name: run_row(name, data, model_dir, a.threads, work), reuse=a.reuse,
                 stored=baseline)

    order = ["dense"] + ROWS
    rows = [json.loads((rows_dir / f"{n}.json").read_text()) for n in order if (rows_dir / f"{n}.json").exists()]
    by = {r["row"]: r for r in rows}
    import transformers
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
            "command": "python benchmarks/svdquant.py " + " ".join(public_args(sys.argv[1:], DIR_ARGS)),
            "protocol": {"calibration": [a.samples, a.seq_len], "eval_windows": [a.eval_windows, 512]},
            "versions": {"tensorpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "notes": a.note}
    chk = checks(by)
    (results / "svdquant.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                      "checks": [{"check": c, "ok": ok} for c, ok in chk]}, indent=2))
    lines = [f"SVDQuant, SmolLM2-135M protocol — {meta['date']}, {meta['machine']}, {a.threads} threads", ""]
    lines += table(rows)
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {c} | {'yes' if ok else ('no' if ok is False else 'not run')} |" for c, ok in chk]
    copied = [r["row"] for r in rows if r.get("copied_from")]
    lines += ["", f"command: `{meta['command']}` (rows stored per row; each row's date is in its JSON)"
              + (f"; {', '.join(copied)} copied from the low-rank / comparison benchmarks' rows (same protocol, "
                 "same worker code path; see each row's copied_from)" if copied else ""),
              f"protocol: calibration {a.samples}×{a.seq_len}, evaluation {a.eval_windows}×512",
              f"versions: {json.dumps(meta['versions'])}",
              "bits/weight: stored bits of the decoder linears per weight (fp16 branch factors, fp32 smoothing vectors).",
              "W4A4 activations are fake-quantised (per token, groups of 64) on CPU; W4A8 runs the int8 reference path.",
              "compress s / CPU s: compression only (loading and evaluation excluded)."] + a.note
    (results / "svdquant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
