"""Command line: ``tensorpress compress | eval | inspect | recipes | export``.

Every user error is one line on stderr and exit code 2; nothing is written on failure
(checkpoints are renamed into place only when complete). ``TENSORPRESS_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

from .errors import TensorpressError

EPILOG = "docs: README.md · recipes: `tensorpress recipes` · protocol: 128×512 calibration, 40×512 eval windows"


def _threads(n: int | None) -> int:
    import torch
    if not n:
        try:                     # a junk OMP_NUM_THREADS ("", "4,2", "lots") falls back to the cores
            n = int(os.environ.get("OMP_NUM_THREADS", 0))
        except ValueError:
            n = 0
        n = n if n > 0 else os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _positive(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if i < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return i


def _output_path(v: str) -> Path:
    out = Path(v)
    try:
        out.exists()
    except (OSError, ValueError) as e:          # a name too long for the file system, a NUL byte
        raise TensorpressError(f"output path {v[:80]!r}... is not usable: {e.__class__.__name__}") from None
    return out


def _megabytes(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MB, got {v!r}") from None
    if not f >= 0 or f == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite size >= 0 in MB, got {v!r}")
    return f


def cmd_recipes(a) -> int:
    from .recipe import Recipe, available_recipes
    for name, path in available_recipes().items():
        try:
            desc = Recipe.load(path).description
        except TensorpressError as e:
            desc = f"(invalid: {e})"
        print(f"{name:<28} {desc}")
    return 0


def _compress_streamed(a) -> int:
    """``compress --stream``: one decoder block in memory at a time, resumable (see compress/streaming.py)."""
    import torch
    from . import api
    from .calib.data import calibration_samples, load_calibration
    from .compress.streaming import compress_streaming, work_dir_for
    from .evaluate import peak_rss_bytes
    from .modeling import _load_tokenizer, resolve_model_path
    from .recipe import Recipe

    out = _output_path(a.output)
    if out.exists():
        raise TensorpressError(f"output path {out} already exists" + (" (the run it belongs to finished)"
                               if a.resume else " (choose another or remove it)"))
    if a.resume and not (work_dir_for(out) / "progress.json").is_file():
        raise TensorpressError(f"nothing to resume for {out}: no interrupted streaming run left "
                               f"{work_dir_for(out).name} next to it")
    recipe = Recipe.load(a.recipe)
    cal = recipe.calibration
    for key, val in (("samples", a.samples), ("seq_len", a.seq_len), ("batch_size", a.batch_size), ("seed", a.seed)):
        if val is not None:
            cal[key] = val
    threads = _threads(a.threads)
    if a.seed is not None:
        torch.manual_seed(a.seed)                    # as the in-memory path: randomized steps reproduce
    model_dir, gguf = resolve_model_path(a.model)
    if gguf is not None:
        raise TensorpressError("--stream reads safetensors weights; a .gguf model cannot be streamed")
    tok = _load_tokenizer(model_dir, None, False)
    if a.calib:
        samples = load_calibration(a.calib, tok, cal["samples"], cal["seq_len"], cal["seed"])
    else:
        if tok is None:
            raise TensorpressError("the model has no tokenizer: pass token ids with --calib FILE.safetensors")
        samples = calibration_samples(tok, cal["samples"], cal["seq_len"], cal["seed"])
    t0 = time.perf_counter()
    report = {"model": str(a.model), "recipe": recipe.to_dict(), "calibration_samples": list(samples.shape),
              "threads": threads, "streamed": True, "activation_budget_mb": a.activation_budget}

    def files(records):
        report.update(compress_seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss_bytes() / 2**20),
                      mean_rel_error=sum(r.rel_error for r in records) / max(len(records), 1))
        return {"report.json": json.dumps(report, indent=2),
                "layers.jsonl": "".join(json.dumps(r.to_dict()) + "\n" for r in records)}

    def show(rec):
        from tqdm.auto import tqdm
        tqdm.write(f"{rec.name:<40} {'+'.join(rec.methods):<12} err {rec.rel_error:.5f}  "
                   f"{rec.seconds:6.2f} s  RSS {rec.peak_rss_mb:7.0f} MB")
    records = compress_streaming(model_dir, recipe, samples, out, batch_size=cal["batch_size"],
                                 stats_source=cal["stats_source"], resume=a.resume,
                                 activation_budget_mb=a.activation_budget, tokenizer=tok, extra_files=files,
                                 progress=not a.quiet, on_record=show if a.verbose else None)
    if not a.no_eval:
        from .checkpoint import load
        comp = api.evaluate(load(out), tok, a.eval_windows, a.eval_seq_len)
        report["compressed"] = comp
        comp.update(label=recipe.name, model_mb=comp["model_bytes"] / 1e6,
                    compress_seconds=report["compress_seconds"], peak_rss_mb=report["peak_rss_mb"])
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        if not a.no_eval:
            print(api.format_table([report["compressed"]]))
        else:
            print(f"compressed {len(records)} linears in {report['compress_seconds']:.1f} s "
                  f"(peak RSS {report['peak_rss_mb']} MB)")
        print(f"checkpoint: {out}  (report.json and layers.jsonl inside)")
    return 0


def cmd_compress(a) -> int:
    if a.stream or a.resume:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TensorpressError("--stream/--resume run in one process; launch them without torchrun")
        return _compress_streamed(a)
    import torch
    from . import api
    from .calib import distributed as dist
    from .calib.data import calibration_samples, load_calibration
    from .checkpoint import save
    from .compress.apply import compress_model
    from .evaluate import peak_rss_bytes
    from .modeling import load_model, resolve_model_path
    from .recipe import Recipe

    out = _output_path(a.output)
    if out.exists():
        raise TensorpressError(f"output path {out} already exists (choose another or remove it)")
    recipe = Recipe.load(a.recipe)
    cal = recipe.calibration
    for key, val in (("samples", a.samples), ("seq_len", a.seq_len), ("batch_size", a.batch_size), ("seed", a.seed)):
        if val is not None:
            cal[key] = val
    threads = _threads(a.threads)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    # Distributed calibration (launched by torchrun: WORLD_SIZE > 1): every rank loads the model and the
    # samples, compresses on its share of the calibration batches (statistics are all-reduced, compressed
    # modules broadcast from rank 0); rank 0 alone evaluates, prints and writes. A no-op otherwise.
    dist.init()                                      # the CLI runs the model on the CPU: gloo
    rank0 = dist.is_main()
    model_dir, _ = resolve_model_path(a.model)
    model, tok = load_model(a.model)
    from .compress.apply import plan
    plan(model, recipe)                              # fail fast on bad ranks/groups, before any work
    if a.calib:
        samples = load_calibration(a.calib, tok, cal["samples"], cal["seq_len"], cal["seed"])
    else:
        if tok is None:
            raise TensorpressError("the model has no tokenizer: pass token ids with --calib FILE.safetensors")
        samples = calibration_samples(tok, cal["samples"], cal["seq_len"], cal["seed"])
    shard = dist.shard_samples(samples, cal["batch_size"])     # this rank's whole batches (all of them alone)
    evaluate = not a.no_eval and rank0
    rows = []
    if evaluate:
        dense = api.evaluate(model, tok, a.eval_windows, a.eval_seq_len,
                             cache_key=api.dense_cache_key(model_dir) if a.eval_windows else None)
        rows.append({"label": "dense", **dense})
    log = io.StringIO()
    t0 = time.perf_counter()
    def show(rec):
        from tqdm.auto import tqdm
        tqdm.write(f"{rec.name:<40} {'+'.join(rec.methods):<12} err {rec.rel_error:.5f}  "
                   f"{rec.seconds:6.2f} s  RSS {rec.peak_rss_mb:7.0f} MB")
    records = compress_model(model, recipe, shard, batch_size=cal["batch_size"],
                             stats_source=cal["stats_source"], progress=not a.quiet and rank0, log_file=log,
                             on_record=show if a.verbose and rank0 else None)
    seconds = time.perf_counter() - t0
    if not rank0:                                    # rank 0 holds the same compressed model and writes it
        del model, records
        dist.finish()                                # wait for rank 0's checkpoint, leave the group
        return 0
    peak = peak_rss_bytes()
    report = {"model": str(a.model), "recipe": recipe.to_dict(), "calibration_samples": list(samples.shape),
              "compress_seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), "threads": threads,
              "mean_rel_error": sum(r.rel_error for r in records) / len(records)}
    if dist.world_size() > 1:
        report["processes"] = dist.world_size()
    if getattr(model, "tensorpress_recovery", None) is not None:     # UniQL masked recovery fine-tuning
        report["recovery"] = model.tensorpress_recovery
    if evaluate:
        comp = api.evaluate(model, tok, a.eval_windows, a.eval_seq_len)
        rows.append({"label": recipe.name, **comp, "compress_seconds": report["compress_seconds"],
                     "peak_rss_mb": report["peak_rss_mb"]})
        report["dense"], report["compressed"] = rows[0], comp
    for r in rows:
        r["model_mb"] = r["model_bytes"] / 1e6
    save(model, out, tokenizer=tok, recipe=recipe,
         extra_files={"report.json": json.dumps(report, indent=2), "layers.jsonl": log.getvalue()})
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        if rows:
            print(api.format_table(rows))
        else:
            print(f"compressed {len(records)} linears in {seconds:.1f} s (peak RSS {report['peak_rss_mb']} MB)")
        print(f"checkpoint: {out}  (report.json and layers.jsonl inside)")
    dist.finish()                                    # the other ranks wait until the checkpoint is written
    return 0


def cmd_eval(a) -> int:
    from . import api
    from .modeling import _load_tokenizer, is_tensorpress_checkpoint, load_model, resolve_model_path
    threads = _threads(a.threads)
    model_dir, gguf = resolve_model_path(a.path)
    pruning = None
    if a.prune_rate is not None:
        # UniQL: slice the sorted checkpoint to the rate now (elastic.py); a bad rate fails before loading
        from . import elastic
        elastic.check_rate(a.prune_rate)
        if gguf is not None or not is_tensorpress_checkpoint(model_dir):
            raise TensorpressError(f"--prune-rate needs a tensorpress checkpoint compressed with the 'uniql' method; "
                                   f"{a.path} is not a tensorpress checkpoint")
        model = elastic.load(model_dir, prune_rate=a.prune_rate)
        tok, pruning = _load_tokenizer(model_dir, None, False), model.tensorpress_pruning
    else:
        model, tok = load_model(a.path)
    if tok is None:
        raise TensorpressError(f"{a.path} has no tokenizer files; evaluation needs one")
    key = api.dense_cache_key(model_dir) if pruning is None else None
    r = api.evaluate(model, tok, a.windows, a.seq_len, progress=not a.quiet, cache_key=key)
    r["threads"] = threads
    if pruning is not None:
        r["prune_rate"], r["realised_prune_rate"] = pruning["rate"], pruning["realised_rate"]
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        r["label"], r["model_mb"] = str(a.path), r["model_bytes"] / 1e6
        if pruning is not None:
            r["label"] += f" @ prune rate {pruning['rate']:g} (realised {pruning['realised_rate']:.4f})"
        print(api.format_table([r]))
    return 0


def cmd_inspect(a) -> int:
    from .checkpoint import load
    from .nn import CompressedLinear
    path = Path(a.path)
    model = load(path)
    errors = {}
    log = path / "layers.jsonl"
    if log.is_file():
        # The log is informative only: lines that are not records (hand-edited, truncated by a
        # kill) are skipped instead of failing the inspection.
        for line in log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("name"), str):
                errors[rec["name"]] = rec
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, CompressedLinear):
            continue
        cfg = m.config()
        w = m.effective_weight()
        rec = errors.get(name, {})
        rows.append({"module": name, "format": cfg["format"], "shape": f"{m.out_features}x{m.in_features}",
                     "bits": cfg.get("bits", "-"), "group": cfg.get("group_size", "-"),
                     "rank": cfg.get("factor_rank", cfg.get("rank", 0)),
                     "bits/weight": round(m.storage_bits() / (m.in_features * m.out_features), 3),
                     "sparsity": round(float((w == 0).float().mean()), 4),
                     "rel_error": round(rec["rel_error"], 5) if isinstance(rec.get("rel_error"), (int, float)) else None,
                     "seconds": rec.get("seconds")})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    heads = list(rows[0]) if rows else []
    cells = [heads] + [["-" if r[h] is None else str(r[h]) for h in heads] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(heads))]
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
    return 0


def cmd_export(a) -> int:
    try:
        from .export import export
    except ImportError:
        raise TensorpressError("export support is not available in this installation") from None
    opts = {}
    if a.checkpoint_format:
        opts["checkpoint_format"] = a.checkpoint_format
    out = export(a.path, a.output, a.format, adapter=not a.no_adapter, **opts)
    print(f"exported {a.format} checkpoint: {out}")
    if (Path(out) / "lora" / "adapter_config.json").is_file():
        print(f"low-rank corrections as a PEFT LoRA adapter: {Path(out) / 'lora'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorpress", description="Compress LLMs after training: low-rank, "
                                "quantisation, pruning; evaluate and export them.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compress", help="compress a model with a recipe and write a checkpoint",
                       description="Compress MODEL with RECIPE block by block on calibration data, evaluate "
                       "dense vs compressed on the protocol, and write a native checkpoint to OUT.")
    c.add_argument("model", help="local HF model directory, a .gguf file, or 'default' (SmolLM2-135M)")
    c.add_argument("--recipe", "-r", required=True, help="shipped recipe name (see `tensorpress recipes`) or YAML path")
    c.add_argument("--output", "-o", required=True, help="checkpoint directory to create (must not exist)")
    c.add_argument("--calib", help="own calibration data: .txt, .jsonl, token .safetensors/.npy, or a datasets dir")
    c.add_argument("--samples", type=_positive, help="calibration samples (default: recipe, 128)")
    c.add_argument("--seq-len", type=_positive, help="calibration sequence length (default: recipe, 512)")
    c.add_argument("--batch-size", type=_positive, help="calibration batch size (default 8)")
    c.add_argument("--seed", type=int, help="draw random calibration windows with this seed (default: first windows)")
    c.add_argument("--eval-windows", type=_positive, default=40, help="evaluation windows (protocol: 40)")
    c.add_argument("--eval-seq-len", type=_positive, default=512, help="evaluation window length (protocol: 512)")
    c.add_argument("--no-eval", action="store_true", help="skip the dense and compressed evaluations")
    c.add_argument("--threads", type=_positive, help="torch threads (default: all cores); reported")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    c.add_argument("--verbose", "-v", action="store_true", help="print one line per compressed linear "
                   "(relative output error on the calibration inputs, seconds, peak RSS)")
    c.add_argument("--stream", action="store_true", help="hold one decoder block in memory at a time (weights read "
                   "from the model's safetensors as needed; for models larger than memory) and record progress so "
                   "that an interrupted run can be resumed; evaluates only the compressed checkpoint")
    c.add_argument("--resume", action="store_true", help="continue an interrupted --stream run with the same "
                   "arguments from its last finished block (implies --stream)")
    c.add_argument("--activation-budget", type=_megabytes, metavar="MB", help="with --stream: keep calibration activations "
                   "in memory up to MB megabytes, spill the rest to disk (default: all in memory)")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="protocol perplexity, size and bits per weight of a model or checkpoint")
    e.add_argument("path", help="checkpoint directory, HF model directory, .gguf file or 'default'")
    e.add_argument("--json", action="store_true", help="print the report as JSON (field 'ppl')")
    e.add_argument("--windows", type=_positive, default=40, help="evaluation windows (protocol: 40)")
    e.add_argument("--seq-len", type=_positive, default=512, help="window length (protocol: 512)")
    e.add_argument("--threads", type=_positive, help="torch threads (default: all cores)")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    e.add_argument("--prune-rate", type=float, metavar="R", help="UniQL checkpoints: prune to rate R (fraction of the "
                   "decoder linears' weights removed, 0 to the checkpoint's max) when loading; no calibration")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="per-layer format, rank, bits, sparsity and error of a checkpoint")
    i.add_argument("path", help="tensorpress checkpoint directory")
    i.add_argument("--json", action="store_true", help="print rows as JSON")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=cmd_recipes)

    x = sub.add_parser("export", help="export a checkpoint to a standard format other engines load")
    x.add_argument("path", help="tensorpress checkpoint directory")
    x.add_argument("--format", "-f", required=True, choices=["gptq", "compressed-tensors", "dense"],
                   help="gptq / compressed-tensors: 4-bit formats engines serve; dense: plain weights "
                   "(any compressed model, e.g. 2:4 or low-rank, materialised)")
    x.add_argument("--output", "-o", required=True, help="directory to create (must not exist)")
    x.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], help="GPTQ zero-point convention (default: gptq = v1 for symmetric models, gptq_v2 for asymmetric)")
    x.add_argument("--no-adapter", action="store_true", help="refuse models with low-rank corrections instead "
                   "of writing them as a PEFT LoRA adapter in OUT/lora (the default)")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "command", None):
        parser.print_help()
        return 2
    try:
        return a.func(a)
    except TensorpressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (nothing was written)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line unless debugging
        if os.environ.get("TENSORPRESS_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: internal error {type(e).__name__}: {msg} (TENSORPRESS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
