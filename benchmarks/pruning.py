"""The pruning family on the protocol (docs/protocol.md), side by side with llm-compressor's Wanda and SparseGPT.

One command (after `make env peers assets`)::

    .venv/bin/python benchmarks/pruning.py [--threads 2] [--rows ROW ...] [--reuse] [--report-only] [--work DIR]

Rows (each in its own process, the same 128×512 calibration tokens and 40×512 evaluation windows,
written once to a file, and the same thread count):

* Wanda and SparseGPT at 50 % unstructured and 2:4 (shipped recipes ``wanda-50``, ``wanda-2of4``,
  ``sparsegpt-50``, ``sparsegpt-2of4``);
* llm-compressor's ``WandaPruningModifier`` and ``SparseGPTModifier`` at the same settings (in
  `.venv-peers`, through ``oneshot`` on the same tokens in the same order
  (``shuffle_calibration_samples=False``: its default reshuffles them every run, and its perplexity
  moved with the order), fp32, ``lm_head`` excluded, its defaults for everything else: sequential
  pipeline, SparseGPT block 128 and dampening 0.01);
* ARMOR 2:4 (``armor-2of4``), Wanda 2:4 + EoRA r64 (``wanda-2of4+eora-r64``);
* LOST-style one-shot at p50 / p80 (``lost-p50``, ``lost-p80``) next to plain SVD at p50 / p80
  (``svd-p50``, ``svd-p80``; ``--svd-from-lowrank`` copies those two rows from
  ``benchmarks/results/lowrank_rows/`` instead of re-running them, same protocol and code path).

Each row reports protocol perplexity, the sparsity of the decoder linears (zeros of the pruned weight
or 2:4 core), bits per weight of the decoder linears (``tensorpress.evaluate.bits_per_weight``: pruned
rows stored dense count 32), model bytes (``tensorpress.evaluate.model_bytes``), compression wall time
and CPU time (model loading and evaluation excluded), and peak RSS of its process. Row results are
kept in ``benchmarks/results/pruning_rows/`` (``--reuse`` keeps rows already there, so a long run can
be finished in parts); the table and checks go to ``benchmarks/results/pruning.{json,md}``.
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

from _common import fmt, machine, public_args, run_rows, run_worker, stored_row, worker_env, write_tokens  # noqa: E402

# name -> (kind, arg): "tp" runs a shipped recipe; "llmc" llm-compressor's modifier (method, sparsity, mask)
ROWS = {
    "wanda-50": ("tp", "wanda-50"),
    "llmc-wanda-50": ("llmc", ("wanda", 0.5, "0:0")),
    "wanda-2of4": ("tp", "wanda-2of4"),
    "llmc-wanda-2of4": ("llmc", ("wanda", 0.5, "2:4")),
    "sparsegpt-50": ("tp", "sparsegpt-50"),
    "llmc-sparsegpt-50": ("llmc", ("sparsegpt", 0.5, "0:0")),
    "sparsegpt-2of4": ("tp", "sparsegpt-2of4"),
    "llmc-sparsegpt-2of4": ("llmc", ("sparsegpt", 0.5, "2:4")),
    "wanda-2of4+eora-r64": ("tp", "wanda-2of4+eora-r64"),
    "lost-p80": ("tp", "lost-p80"),
    "svd-p80": ("tp", "svd-p80"),
    "lost-p50": ("tp", "lost-p50"),
    "svd-p50": ("tp", "svd-p50"),
    "armor-2of4": ("tp", "armor-2of4"),
}

# Decoder-linear statistics shared by both workers: zeros of the pruned weight / 2:4 core, and how many
# groups of 4 consecutive inputs keep more than 2 non-zeros (0 for a valid 2:4 model).
STATS = r'''
def linear_stats(model):
    try:
        return _linear_stats(model)
    except Exception as e:                        # a statistic must never cost a row
        return {"sparsity": None, "groups_over_2of4": None, "stats_error": repr(e)[:200]}

def _linear_stats(model):
    from tensorpress.modeling import decoder_layers, target_linears
    zeros = total = over = 0
    for layer in decoder_layers(model):
        for m in target_linears(layer).values():
            if hasattr(m, "core_weight"):
                w = m.core_weight()
            elif getattr(m, "FORMAT", "dense") == "dense":
                w = m.weight
            else:
                return {"sparsity": None, "groups_over_2of4": None}
            w = w.detach()
            zeros += int((w == 0).sum()); total += w.numel()
            over += int(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) > 2).sum())
    return {"sparsity": zeros / total, "groups_over_2of4": over}
'''

WORKER = r'''
import json, os, resource, sys, time
import torch
from safetensors.torch import load_file
sys.path.insert(0, os.environ["TP_ROOT"])
from tensorpress.evaluate import bits_per_weight, model_bytes, perplexity
from tensorpress.recipe import Recipe
from tensorpress.compress.apply import compress_model
''' + STATS + r'''
name, recipe_name, data, model_dir, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t = load_file(data)
calib, windows = t["calib"], t["eval"]
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
recipe = Recipe.load(recipe_name)
if os.environ.get("TP_BENCH_SMOKE_ITERS"):          # smoke runs only: cut ARMOR's iterations
    d = recipe.to_dict()
    for s in d["stages"]:
        if s["method"] == "armor":
            s["iterations"] = int(os.environ["TP_BENCH_SMOKE_ITERS"])
    recipe = Recipe.load(d)
t0, c0 = time.perf_counter(), cpu()
records = compress_model(model, recipe, calib, progress=False)
seconds, cpu_s = time.perf_counter() - t0, cpu() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ev = perplexity(model, windows, progress=False)
print("RESULT " + json.dumps({"row": name, "tool": "tensorpress", "recipe": recipe.to_dict(),
      "compress_seconds": round(seconds, 1), "compress_cpu_seconds": round(cpu_s, 1),
      "peak_rss_mb": round(peak / 2**20), "threads": int(threads),
      "bits_per_weight": bits_per_weight(model)["bits_per_weight"], "model_bytes": model_bytes(model),
      **linear_stats(model), "mean_rel_error": sum(r.rel_error for r in records) / len(records), **ev}))
'''

WORKER_LLMC = r'''
import json, os, resource, sys, time
import torch
from safetensors.torch import load_file
sys.path.insert(0, os.environ["TP_ROOT"])
from tensorpress.evaluate import bits_per_weight, model_bytes, perplexity
''' + STATS + r'''
name, method, sparsity, mask, data, model_dir, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t = load_file(data)
calib, windows = t["calib"], t["eval"]
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
head_zeros = int((model.lm_head.weight == 0).sum())
import datasets
import importlib.metadata as md
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
# lm_head excluded: with the default targets ["Linear"] the module names carry a trailing "." and an exact
# "lm_head" would not match (and the tied lm_head would prune the embeddings); the regex form matches.
mod = cls(sparsity=float(sparsity), mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])
ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
t0, c0 = time.perf_counter(), cpu()
# shuffle_calibration_samples=False: the samples in the file's order, as ours read them (its default, True,
# draws a fresh random order each run, and the statistics' summation order then moves its perplexity).
oneshot(model=model, dataset=ds, recipe=mod, max_seq_length=calib.shape[1], num_calibration_samples=calib.shape[0],
        shuffle_calibration_samples=False)
seconds, cpu_s = time.perf_counter() - t0, cpu() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
lm_head_new_zeros = int((model.lm_head.weight == 0).sum()) - head_zeros
assert lm_head_new_zeros == 0, f"lm_head was pruned ({lm_head_new_zeros} new zeros)"
ev = perplexity(model, windows, progress=False)
settings = {k: v for k, v in mod.model_dump().items() if not k.startswith("_") and k not in ("index", "group", "start", "end", "update", "initialized_", "finalized_", "started_", "ended_")}
print("RESULT " + json.dumps({"row": name, "tool": "llm-compressor", "settings": json.loads(json.dumps(settings, default=str)),
      "compress_seconds": round(seconds, 1), "compress_cpu_seconds": round(cpu_s, 1),
      "peak_rss_mb": round(peak / 2**20), "threads": int(threads),
      "bits_per_weight": bits_per_weight(model)["bits_per_weight"], "model_bytes": model_bytes(model),
      **linear_stats(model), "lm_head_new_zeros": lm_head_new_zeros, **ev,
      "versions": {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}))
'''


def run_row(name: str, data: Path, model_dir: Path, threads: int, peers_python: str, work: Path,
            timeout: float, smoke_iters: int | None) -> dict:
    kind, arg = ROWS[name]
    env = worker_env(ROOT, threads)
    if smoke_iters is not None:
        env["TP_BENCH_SMOKE_ITERS"] = str(smoke_iters)
    if kind == "tp":
        cmd = [sys.executable, "-c", WORKER, name, arg, str(data), str(model_dir), str(threads)]
    else:
        method, sparsity, mask = arg
        cmd = [peers_python, "-c", WORKER_LLMC, name, method, str(sparsity), mask, str(data), str(model_dir),
               str(threads)]
    res = run_worker(name, cmd, env, work, timeout)
    res["row"] = name
    return res


def table(rows: list[dict]) -> list[str]:
    out = ["| row | tool | ppl | sparsity | bits/weight | MB | compress s | CPU s | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['row']} | {r.get('tool', '')} | {r['ppl']:.3f} | {fmt(r.get('sparsity'), '{:.3f}')} | "
                   f"{fmt(r.get('bits_per_weight'), '{:.2f}')} | "
                   f"{fmt(r.get('model_bytes') and r['model_bytes'] / 2**20, '{:.1f}')} | "
                   f"{fmt(r.get('compress_seconds'), '{}')} | {fmt(r.get('compress_cpu_seconds'), '{}')} | "
                   f"{fmt(r.get('peak_rss_mb'), '{}')} |")
    return out


NO_WORSE_TOL = 1e-3          # relative perplexity difference that counts as a tie (float summation order)


def checks(by: dict) -> list[tuple[str, bool | None, str]]:
    def ppl(a):
        return by[a]["ppl"] if a in by else None

    def cmp(a, b, factor=1.0):
        if a not in by or b not in by:
            return None, ""
        return by[a]["ppl"] * factor < by[b]["ppl"], f"{by[a]['ppl']:.3f} vs {by[b]['ppl']:.3f}"

    def no_worse(a, b):
        # "No worse" allows float noise: the same method run by two tools sums its statistics in a
        # different order, which moves perplexity by ~1e-5 relative (and llm-compressor's own runs with
        # shuffled samples moved its Wanda 50 % by 0.18 %). Within NO_WORSE_TOL it is a tie, said so.
        if a not in by or b not in by:
            return None, ""
        pa, pb = by[a]["ppl"], by[b]["ppl"]
        rel = pa / pb - 1
        detail = f"{pa:.3f} vs {pb:.3f} ({rel * 100:+.4f} %{', a tie' if 0 < rel <= NO_WORSE_TOL else ''})"
        return rel <= NO_WORSE_TOL, detail

    out = []
    for s, label in (("wanda-50", "Wanda 50%"), ("wanda-2of4", "Wanda 2:4"), ("sparsegpt-50", "SparseGPT 50%"),
                     ("sparsegpt-2of4", "SparseGPT 2:4")):
        out.append((f"{label}: ours no worse than llm-compressor (ppl, ties within {NO_WORSE_TOL:.1%})",
                    *no_worse(s, "llmc-" + s)))
    # "clearly": at least 10 % lower perplexity than the better of the two 2:4 rows
    for b, label in (("wanda-2of4", "Wanda 2:4"), ("sparsegpt-2of4", "SparseGPT 2:4")):
        out.append((f"ARMOR 2:4 beats {label} clearly (ppl ≥ 10 % lower)", *cmp("armor-2of4", b, factor=1.1)))
    out.append(("Wanda 2:4 + EoRA r64 improves on Wanda 2:4 (ppl)", *cmp("wanda-2of4+eora-r64", "wanda-2of4")))
    out.append(("LOST p50 beats plain SVD p50 (ppl)", *cmp("lost-p50", "svd-p50")))
    out.append(("LOST p80 beats plain SVD p80 (ppl)", *cmp("lost-p80", "svd-p80")))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--reuse", action="store_true", help="keep rows already in benchmarks/results/pruning_rows/")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from the stored rows")
    ap.add_argument("--svd-from-lowrank", action="store_true",
                    help="copy svd-p50/svd-p80 from benchmarks/results/lowrank_rows/ instead of running them")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--smoke", action="store_true",
                    help="plumbing check only: 4 calibration samples, 2 eval windows, ARMOR 2 iterations, "
                         "results under WORK/smoke-results (never the committed ones)")
    ap.add_argument("--row-timeout", type=float, default=3 * 3600, help="seconds per row (default 3 h)")
    ap.add_argument("--note", action="append", default=[], help="a line added to the report (e.g. run conditions)")
    ap.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    ap.add_argument("--work", help="scratch directory (token file); default: a new temp dir")
    ap.add_argument("--peers-python", default=os.environ.get("TENSORPRESS_PEERS_PYTHON", str(ROOT / ".venv-peers/bin/python")))
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tensorpress import __version__, assets
    from tensorpress.evaluate import perplexity

    work = Path(a.work or tempfile.mkdtemp(prefix="tp-pruning-"))
    smoke_iters = None
    if a.smoke:
        a.samples, a.eval_windows, smoke_iters = 4, 2, 2
        work = work / "smoke"
        a.out = str(work / "smoke-results")
    work.mkdir(parents=True, exist_ok=True)
    results = Path(a.out)
    rows_dir = results / "pruning_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    model_dir = assets.default_model_dir()
    if not a.report_only:
        if any(ROWS[r][0] == "llmc" for r in a.rows) and not Path(a.peers_python).exists():
            print(f"error: peers environment not found at {a.peers_python} (run `make peers`)", file=sys.stderr)
            return 2
        tok = AutoTokenizer.from_pretrained(model_dir)
        data, windows = write_tokens(work, tok, a.samples, a.seq_len, a.eval_windows)
        dense_file = rows_dir / "dense.json"
        if not (a.reuse and dense_file.exists()):
            dense = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), windows,
                               progress=False)
            dense_file.write_text(json.dumps({"row": "dense", "tool": "dense fp32", "sparsity": 0.0,
                                              "bits_per_weight": 32.0, **dense}))
        def from_lowrank(name):
            if not (a.svd_from_lowrank and name.startswith("svd-") and not a.smoke):
                return None
            return stored_row(RESULTS, name, ("lowrank_rows",))

        run_rows(a.rows, rows_dir, lambda name: run_row(name, data, model_dir, a.threads, a.peers_python, work,
                                                        a.row_timeout, smoke_iters),
                 reuse=a.reuse, stored=from_lowrank, summary=("ppl", "compress_seconds", "compress_cpu_seconds"))

    order = ["dense"] + list(ROWS)
    rows = [json.loads((rows_dir / f"{n}.json").read_text()) for n in order if (rows_dir / f"{n}.json").exists()]
    by = {r["row"]: r for r in rows}
    import transformers
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
            "command": "python benchmarks/pruning.py " + " ".join(public_args(sys.argv[1:])),
            "protocol": {"calibration": [a.samples, a.seq_len], "eval_windows": [a.eval_windows, 512]},
            "versions": {"tensorpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "peer": next((r.get("versions") for r in rows if r.get("versions")), None)},
            "notes": a.note, "llm-compressor settings": {r["row"]: r.get("settings") for r in rows if r.get("tool") == "llm-compressor"}}
    chk = checks(by)
    (results / "pruning.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": [
        {"check": c, "ok": ok, "ppl": detail} for c, ok, detail in chk]}, indent=2))
    lines = [f"Pruning family, SmolLM2-135M protocol — {meta['date']}, {meta['machine']}, {a.threads} threads", ""]
    lines += table(rows)
    lines += ["", "| check | ppl | result |", "|---|---|---|"]
    lines += [f"| {c} | {d or '-'} | {'yes' if ok else ('no' if ok is False else 'not run')} |" for c, ok, d in chk]
    copied = [r["row"] for r in rows if r.get("copied_from")]
    lines += ["", f"command: `{meta['command']}` (rows stored per row; each row's date is in its JSON)"
              + (f"; {', '.join(copied)} copied from `benchmarks/results/lowrank_rows/` (same protocol, same code path)"
                 if copied else ""),
              f"versions: {json.dumps(meta['versions'])}",
              "sparsity: zeros of the decoder linears' pruned weights (ARMOR: of the 2:4 core; '-' for factorised layers).",
              "bits/weight: stored bits of the decoder linears per weight; pruned layers stored dense (fp32 with zeros) "
              "count 32, as llm-compressor's dense output does; ARMOR counts the 2:4 values, 2-bit indices and wrappers.",
              "compress s / CPU s: compression only (loading and evaluation excluded)."] + a.note
    (results / "pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
