"""UniQL on the protocol (docs/protocol.md): ONE sorted 4-bit checkpoint, pruned when it is loaded.

One command (after `make env assets`)::

    .venv/bin/python benchmarks/uniql.py [--threads 2] [--rates 0 0.15 0.25 0.35] [--reuse] [--work DIR]

Rows, each in its own process, on the same 128×512 calibration tokens and 40×512 evaluation windows
(written once to a file) and the same thread count:

* ``dense``: the fp32 reference model;
* ``compress uniql-w4``: the shipped recipe, compressed once and saved (``WORK/ckpt-uniql-w4``);
* ``compress unsorted``: the same recipe with ``sort: false`` (original channel order, no V/O rotation,
  the same quantiser, groups and grids), saved (``WORK/ckpt-unsorted``);
* ``uniql-w4 @ r`` for every rate: ``tensorpress.load(WORK/ckpt-uniql-w4, prune_rate=r)``;
* with ``--recovery``: ``compress uniql-w4-ft`` (the same sorting, masked LoRA recovery fine-tuning,
  then the same quantiser; ``WORK/ckpt-uniql-w4-ft``) and ``uniql-w4-ft @ r`` for every rate;
* ``unsorted @ r``: the unsorted checkpoint sliced to exactly the kept sizes the sorted one got at ``r``
  (``elastic.apply_sizes``): the same layers, the same widths, the same grids, but each kept set is
  the first channels of the original order (MLP: channels ``[:m]``; q/k: the first ``d'/2`` of each
  RoPE half, so pairs stay intact; V/O: the first ``d'`` dims of every head) — "pruning the same
  amount without sorting".

Each evaluation row reports protocol perplexity, the bytes of the sliced model (all tensors), the
stored bits of its decoder linears per *original* decoder weight, the realised rate, prefill
throughput (tokens/s of the perplexity pass: batches of 4×512) and decode throughput (greedy,
batch 1, KV cache, ``--decode-tokens`` new tokens after a 64-token prompt). Speeds are CPU numbers of
a shared machine: compare them only as ratios within one run. Row results are kept in
``benchmarks/results/uniql_rows/`` (``--reuse`` keeps rows already there); the table goes to
``benchmarks/results/uniql.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

from _common import DIR_ARGS, fmt, machine, public_args, run_rows, run_worker, worker_env, write_tokens  # noqa: E402

RECIPE = "uniql-w4"
RECIPE_FT = "uniql-w4-ft"        # the same with masked recovery fine-tuning (--recovery)


# --- workers (one process per row) -------------------------------------------------------------------

def _speed(model, windows, decode_tokens: int) -> dict:
    import torch
    from tensorpress.evaluate import perplexity
    t0 = time.perf_counter()
    ev = perplexity(model, windows, progress=False)
    eval_s = time.perf_counter() - t0
    prompt = windows[:1, :64]
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)      # warm-up
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
        dec_s = time.perf_counter() - t0
    new = out.shape[1] - prompt.shape[1]
    return {**ev, "eval_seconds": round(eval_s, 2), "prefill_tok_s": round(ev["scored_tokens"] / eval_s, 1),
            "decode_tok_s": round(new / dec_s, 2), "decode_tokens": int(new)}


def _sizes(model, total_weights: int) -> dict:
    from tensorpress.evaluate import model_bytes
    from tensorpress.modeling import decoder_layers, target_linears
    from tensorpress.nn import CompressedLinear
    bits = 0
    for layer in decoder_layers(model):
        for m in target_linears(layer).values():
            bits += m.storage_bits() if isinstance(m, CompressedLinear) else m.weight.numel() * m.weight.element_size() * 8
    return {"model_bytes": model_bytes(model), "linear_bits_per_orig_weight": bits / total_weights}


def worker(spec: dict) -> dict:
    import resource
    import torch
    from safetensors.torch import load_file
    torch.set_num_threads(spec["threads"])
    t = load_file(spec["data"])
    calib, windows = t["calib"], t["eval"]
    kind = spec["kind"]
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])        # noqa: E731
    if kind == "dense":
        from transformers import AutoModelForCausalLM
        from tensorpress.modeling import linear_weight_count
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
        return {**_sizes(model, linear_weight_count(model)), **_speed(model, windows, spec["decode_tokens"]),
                "realised_rate": 0.0}
    if kind == "compress":
        from transformers import AutoModelForCausalLM
        import tensorpress as tp
        from tensorpress.compress.apply import compress_model
        from tensorpress.recipe import Recipe
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
        d = Recipe.load(spec.get("recipe", RECIPE)).to_dict()
        d["stages"][0].update(spec["overrides"])
        recipe = Recipe.load(d)
        t0, c0 = time.perf_counter(), cpu()
        records = compress_model(model, recipe, calib, progress=False)
        seconds, cpu_s = time.perf_counter() - t0, cpu() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        shutil.rmtree(spec["out"], ignore_errors=True)
        tp.save(model, spec["out"], recipe=recipe)
        from tensorpress import elastic
        plan = elastic.read_plan(model)
        return {"recipe": recipe.to_dict(), "compress_seconds": round(seconds, 1), "compress_cpu_seconds": round(cpu_s, 1),
                "peak_rss_mb": round(peak / 2**20), "mean_rel_error": sum(r.rel_error for r in records) / len(records),
                "influence": [l.influence for l in plan.layers],
                **({"recovery": model.tensorpress_recovery} if hasattr(model, "tensorpress_recovery") else {})}
    from tensorpress import elastic
    from tensorpress.checkpoint import load
    rate = spec["rate"]
    if kind == "sorted":
        import tensorpress as tp
        model = tp.load(spec["ckpt"], prune_rate=rate)
        plan_total = model.tensorpress_pruning["decoder_linear_weights"]
    else:                                   # unsorted: the sorted checkpoint's kept sizes at this rate
        ref = load(spec["sizes_from"])
        sizes = elastic.allocate(elastic.read_plan(ref), rate)
        del ref
        model = load(spec["ckpt"])
        plan = elastic.read_plan(model)
        plan_total = plan.total
        elastic.apply_sizes(model, plan, sizes)
    info = model.tensorpress_pruning
    return {**_sizes(model, plan_total), **_speed(model, windows, spec["decode_tokens"]), "rate": rate,
            "realised_rate": info["realised_rate"], "attn_head_dim": info["attn_head_dim"], "mlp_width": info["mlp_width"]}


# --- the driver ------------------------------------------------------------------------------------

def run_row(name: str, spec: dict, work: Path, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    # Passive OpenMP waits: on a shared machine, spinning worker threads made GPTQ and eigh 20-100x slower
    # (results are unchanged: only how idle threads wait).
    res = run_worker(name, cmd, worker_env(ROOT, threads, OMP_WAIT_POLICY="PASSIVE"), work, timeout)
    res["row"] = name
    return res


def table(rows: list[dict], dense: dict | None) -> list[str]:
    out = ["| row | rate (realised) | ppl | model MB | linear bits / orig. weight | prefill tok/s | decode tok/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = "-" if r.get("rate") is None else f"{r['rate']:g} ({r['realised_rate']:.3f})"
        out.append(f"| {r['row']} | {rate} | {r['ppl']:.3f} | {r['model_bytes'] / 2**20:.1f} | "
                   f"{r['linear_bits_per_orig_weight']:.2f} | {fmt(r.get('prefill_tok_s'), '{:.0f}')} | "
                   f"{fmt(r.get('decode_tok_s'), '{:.1f}')} |")
    return out


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.15, 0.25, 0.35])
    ap.add_argument("--samples", type=int, default=128, help="calibration samples (protocol: 128)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration length (protocol: 512)")
    ap.add_argument("--eval-windows", type=int, default=40, help="evaluation windows of 512 (protocol: 40)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens of the decode-speed measurement")
    ap.add_argument("--quantizer", choices=["gptq", "rtn"], help="override the recipe's quantiser (every checkpoint)")
    ap.add_argument("--recovery", action="store_true", help=f"also the checkpoint of {RECIPE_FT} (masked recovery "
                    "fine-tuning) and its rows at every rate")
    ap.add_argument("--reuse", action="store_true", help="keep rows (and checkpoints in WORK) already there")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from the stored rows")
    ap.add_argument("--smoke", action="store_true", help="plumbing check: 4 calibration samples, 2 eval windows, "
                    "4 decode tokens, results under WORK/smoke-results (never the committed ones)")
    ap.add_argument("--row-timeout", type=float, default=2 * 3600)
    ap.add_argument("--note", action="append", default=[], help="a line added to the report")
    ap.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    ap.add_argument("--work", help="scratch directory (tokens, checkpoints); default: a new temp dir")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoTokenizer
    from tensorpress import __version__, assets

    work = Path(a.work or tempfile.mkdtemp(prefix="tp-uniql-"))
    if a.smoke:
        a.samples, a.eval_windows, a.decode_tokens = 4, 2, 4
        work = work / "smoke"
        a.out = str(work / "smoke-results")
    work.mkdir(parents=True, exist_ok=True)
    results = Path(a.out)
    rows_dir = results / "uniql_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    model_dir = assets.default_model_dir()
    overrides = {} if a.quantizer is None else {"quantizer": a.quantizer}
    names = ["dense", "compress-uniql-w4", "compress-unsorted"] + (["compress-uniql-w4-ft"] if a.recovery else [])
    names += [f"uniql-w4@{r:g}" for r in a.rates] + [f"unsorted@{r:g}" for r in a.rates]
    names += [f"uniql-w4-ft@{r:g}" for r in a.rates] if a.recovery else []
    if not a.report_only:
        tok = AutoTokenizer.from_pretrained(model_dir)
        data, _ = write_tokens(work, tok, a.samples, a.seq_len, a.eval_windows)
        base = {"data": str(data), "model_dir": str(model_dir), "threads": a.threads, "decode_tokens": a.decode_tokens}
        ck = {"uniql-w4": work / "ckpt-uniql-w4", "unsorted": work / "ckpt-unsorted", "uniql-w4-ft": work / "ckpt-uniql-w4-ft"}
        specs = {"dense": {"kind": "dense"},
                 "compress-uniql-w4": {"kind": "compress", "overrides": overrides, "out": str(ck["uniql-w4"])},
                 "compress-unsorted": {"kind": "compress", "overrides": {**overrides, "sort": False},
                                       "out": str(ck["unsorted"])},
                 "compress-uniql-w4-ft": {"kind": "compress", "recipe": RECIPE_FT, "overrides": overrides,
                                          "out": str(ck["uniql-w4-ft"])}}
        for r in a.rates:
            specs[f"uniql-w4@{r:g}"] = {"kind": "sorted", "rate": r, "ckpt": str(ck["uniql-w4"])}
            specs[f"unsorted@{r:g}"] = {"kind": "unsorted", "rate": r, "ckpt": str(ck["unsorted"]),
                                        "sizes_from": str(ck["uniql-w4"])}
            specs[f"uniql-w4-ft@{r:g}"] = {"kind": "sorted", "rate": r, "ckpt": str(ck["uniql-w4-ft"])}
        # a checkpoint row is kept only while its checkpoint is still in WORK (the rate rows load it)
        run_rows(names, rows_dir, lambda name: run_row(name, {**base, **specs[name]}, work, a.threads, a.row_timeout),
                 reuse=a.reuse, keep=lambda name, f: specs[name]["kind"] != "compress" or Path(specs[name]["out"]).exists(),
                 summary=("ppl", "realised_rate", "compress_seconds", "process_seconds"))

    rows = {n: json.loads((rows_dir / f"{n}.json").read_text()) for n in names if (rows_dir / f"{n}.json").exists()}
    comp = {k: rows.pop(k) for k in ("compress-uniql-w4", "compress-unsorted", "compress-uniql-w4-ft") if k in rows}
    ev = list(rows.values())
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
            "command": "python benchmarks/uniql.py " + " ".join(public_args(sys.argv[1:], DIR_ARGS)),
            "protocol": {"calibration": [a.samples, a.seq_len], "eval_windows": [a.eval_windows, 512]},
            "versions": {"tensorpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "notes": a.note}
    (results / "uniql.json").write_text(json.dumps({"meta": meta, "compress": comp, "rows": ev}, indent=2))
    lines = [f"UniQL on the SmolLM2-135M protocol — {meta['date']}, {meta['machine']}, {a.threads} threads", ""]
    lines += table(ev, rows.get("dense"))
    lines += ["", "| checkpoint | compress s | CPU s | peak RSS MB | mean rel. error (sorted layers) |", "|---|---|---|---|---|"]
    for k, r in comp.items():
        lines.append(f"| {k.removeprefix('compress-')} | {r['compress_seconds']} | {r['compress_cpu_seconds']} | "
                     f"{r['peak_rss_mb']} | {r['mean_rel_error']:.4f} |")
    lines += ["", f"command: `{meta['command']}` (each row in its own process; each row's date is in its JSON)",
              f"versions: {json.dumps(meta['versions'])}",
              "uniql-w4 @ r: ONE checkpoint (recipe uniql-w4: sorting + GPTQ 4-bit g64, o_proj g16), loaded with "
              "`tensorpress.load(path, prune_rate=r)`: layer-wise kept sizes from the stored block influences, every "
              "layer sliced on its codes, no calibration.",
              "unsorted @ r: the same recipe with `sort: false` (original order, no V/O rotation; same quantiser, "
              "groups and grids), sliced to exactly the kept sizes the sorted checkpoint got at r: first MLP channels, "
              "first d'/2 of each RoPE half of q/k, first d' dims of every V/O head.",
              *([f"uniql-w4-ft @ r: ONE checkpoint of recipe {RECIPE_FT}: the same sorting, then LoRA r8 trained on the "
                 "calibration sequences under the loader's masks at sampled rates 0.05-0.4, merged (best epoch by "
                 "held-out loss), then the same GPTQ on the fine-tuned model; loaded like uniql-w4. Fine-tuning report "
                 "(losses per epoch, kept epoch) in uniql.json under compress."] if "compress-uniql-w4-ft" in comp else []),
              "rate: fraction of the decoder linears' weights removed (requested, realised after the 16/64 grids); "
              "model MB: every tensor of the sliced model (fp32 embeddings/norms included); linear bits / orig. weight: "
              "stored bits of the decoder linears (codes, scales, zeros, biases excluded) per weight of the dense "
              "decoder linears.",
              "prefill tok/s: the perplexity pass (batches of 4×512, fp32 activations, CPU reference W4 kernel: "
              "dequantise + GEMM); decode tok/s: greedy batch-1 generation with a KV cache. Shared machine: compare "
              "speeds only as ratios within one run.",
              "The reference dense model's weights come from a 4-bit GGUF (dequantised to fp32), so 4-bit "
              "re-quantisation costs less than it would on a native fp16 model."] + a.note
    (results / "uniql.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
