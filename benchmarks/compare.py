"""The whole comparison: every shipped method at its standard settings beside the peer toolkits that run
on a CPU, on the protocol (docs/protocol.md), in one table and two plots.

One command from a fresh clone (environments, model and text included)::

    make bench-compare            # = make env peers assets, then:
    .venv/bin/python benchmarks/compare.py [--threads 2] [--rows ROW ...] [--reuse] [--adopt]

Every row runs in its own process on the same 128×512 calibration tokens and 40×512 evaluation windows
(written once to a file) with the same thread count, scored by the same perplexity function:

* quantisation (plotted as perplexity against bits per weight): tensorpress RTN, GPTQ, GPTQ + EoRA r32
  and SVDQuant W4A16 r32 at 4 bits and the 3-bit rows (SVDQuant W3A16 r32 among them) (the default model's weights came from a 4-bit
  GGUF file, so 4-bit results alone can flatter), llm-compressor GPTQ, GPTQModel GPTQ alone and + EoRA r32,
  bitsandbytes NF4 and HQQ 4/3-bit (peers in ``.venv-peers``, so their pins never constrain ours);
* low-rank (perplexity against the fraction of parameters kept): plain SVD, SVD-LLM, ASVD, FWSVD at
  p80 / p50 and SVD-LLM p80 with the measured-sensitivity allocation;
* pruning: Wanda and SparseGPT 50 % and 2:4 beside llm-compressor's, ARMOR 2:4.

Rows are the family benchmarks' own runners (``lowrank.py``, ``pruning.py``, ``svdquant.py``; a row here is produced
by exactly the code that produces it there) plus ``peers/quant_libs.py`` (bitsandbytes, HQQ) and
llm-compressor's GPTQ (``gptq_vs_llmcompressor.py``'s worker). Each row is stored in
``benchmarks/results/compare_rows/`` with its date, versions and settings; ``--reuse`` keeps stored
rows (a full run is about 8 hours on 2 cores, so it can be done in parts), ``--adopt`` first copies
rows the family benchmarks already stored on the same protocol (marked ``adopted_from``). The
report: ``benchmarks/results/compare.{json,md}``, ``compare-bits.png``, ``compare-lowrank.png``, and
the README's results block (``--readme``).
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
README_BEGIN, README_END = "<!-- compare-results:start -->", "<!-- compare-results:end -->"
SCORED_TOKENS = 40 * 511            # the protocol's 40 windows of 512 tokens, 511 predictions each

from _common import fmt, machine, public_args, run_rows, run_worker, stored_row, worker_env, write_tokens  # noqa: E402

# name -> (family, runner, arg). runner: "lowrank" / "pruning" / "svdquant" run that benchmark's row of the same
# name; "tp" runs a shipped recipe through lowrank.py's worker; "llmc-gptq" (bits, group);
# "quantlib" (library, bits, group) through peers/quant_libs.py.
ROWS = {
    "rtn-w4g64": ("quant", "tp", "rtn-w4g64"),
    "gptq-w4g64": ("quant", "lowrank", None),
    "gptq-w4g64+eora-r32": ("quant", "lowrank", None),
    "svdquant-w4a16-r32": ("quant", "svdquant", None),
    "llmc-gptq-w4g64": ("quant", "llmc-gptq", (4, 64)),
    "gptqmodel-w4g64": ("quant", "lowrank", None),
    "gptqmodel-w4g64+eora-r32": ("quant", "lowrank", None),
    "bnb-nf4": ("quant", "quantlib", ("bnb", 4, 64)),
    "hqq-w4g64": ("quant", "quantlib", ("hqq", 4, 64)),
    "rtn-w3g64": ("quant", "tp", "rtn-w3g64"),
    "gptq-w3g64": ("quant", "lowrank", None),
    "gptq-w3g64+eora-r32": ("quant", "lowrank", None),
    "svdquant-w3a16-r32": ("quant", "svdquant", None),
    "llmc-gptq-w3g64": ("quant", "llmc-gptq", (3, 64)),
    "hqq-w3g64": ("quant", "quantlib", ("hqq", 3, 64)),
    "svd-p80": ("lowrank", "lowrank", None),
    "svdllm-p80": ("lowrank", "lowrank", None),
    "asvd-p80": ("lowrank", "lowrank", None),
    "fwsvd-p80": ("lowrank", "lowrank", None),
    "svdllm-p80-sensitivity": ("lowrank", "lowrank", None),
    "svd-p50": ("lowrank", "lowrank", None),
    "svdllm-p50": ("lowrank", "lowrank", None),
    "asvd-p50": ("lowrank", "lowrank", None),
    "fwsvd-p50": ("lowrank", "lowrank", None),
    "wanda-50": ("sparse", "pruning", None),
    "llmc-wanda-50": ("sparse", "pruning", None),
    "sparsegpt-50": ("sparse", "pruning", None),
    "llmc-sparsegpt-50": ("sparse", "pruning", None),
    "wanda-2of4": ("sparse", "pruning", None),
    "llmc-wanda-2of4": ("sparse", "pruning", None),
    "sparsegpt-2of4": ("sparse", "pruning", None),
    "llmc-sparsegpt-2of4": ("sparse", "pruning", None),
    "armor-2of4": ("sparse", "pruning", None),
}
FAMILY_TITLES = {"quant": "Quantisation", "lowrank": "Low-rank factorisation", "sparse": "Pruning"}


def format_bits(bits: int, group: int, scale_bits: int = 16, zero_bits: int = 0) -> float:
    """Bits per weight of a group-quantised format: the codes plus one scale (and zero) per group."""
    return bits + (scale_bits + zero_bits) / group


def adapter_bits(model_dir: Path, rank: int, factor_bits: int = 16) -> float:
    """Bits per decoder-linear weight of a rank-``rank`` adapter (A and B) on every decoder linear."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from tensorpress.modeling import decoder_layers, target_linears
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    lins = [m for layer in decoder_layers(model) for m in target_linears(layer).values()]
    return sum(rank * (m.in_features + m.out_features) * factor_bits for m in lins) / sum(
        m.in_features * m.out_features for m in lins)


def with_format_bits(name: str, res: dict, model_dir: Path) -> dict:
    """Peers that keep a fake-quantised fp32 model report no stored size: their saved format sets it."""
    if res.get("bits_per_weight") is not None:
        return res
    if name.startswith("llmc-gptq-"):
        # compressed-tensors pack-quantized, symmetric: codes + one fp16 scale per group
        bits, group = ROWS[name][2]
        res["bits_per_weight"] = format_bits(bits, group)
        res["bits_note"] = "its saved format: codes + fp16 scale per group (compressed-tensors pack-quantized)"
    elif name.startswith("gptqmodel-"):
        # GPTQ format (sym too): codes, fp16 scale and a packed 4-bit zero per group; fp16 LoRA adapter
        s = res.get("settings", {}).get("QuantizeConfig", {})
        bits, group, rank = s.get("bits", 4), s.get("group_size", 64), res.get("rank", 32)
        res["bits_per_weight"] = format_bits(bits, group, 16, 4) + adapter_bits(model_dir, rank)
        res["bits_note"] = "its saved format: GPTQ codes + fp16 scale + 4-bit zero per group, fp16 EoRA adapter"
    return res


def run_row(name: str, data: Path, model_dir: Path, threads: int, peers_python: str, work: Path) -> dict:
    family, runner, arg = ROWS[name]
    if runner == "lowrank":
        import lowrank
        return lowrank.run_row(name, data, model_dir, threads, peers_python, work)
    if runner == "pruning":
        import pruning
        return pruning.run_row(name, data, model_dir, threads, peers_python, work, 3 * 3600, None)
    if runner == "svdquant":
        import svdquant
        return svdquant.run_row(name, data, model_dir, threads, work)
    env = worker_env(ROOT, threads)
    if runner == "tp":
        import lowrank
        cmd = [sys.executable, "-c", lowrank.WORKER, name, arg, str(data), str(model_dir), str(threads), str(work)]
    elif runner == "llmc-gptq":
        import gptq_vs_llmcompressor as gv
        bits, group = arg
        cmd = [peers_python, "-c", gv.WORKER, "llm-compressor", str(bits), str(group), str(data), str(model_dir),
               str(threads)]
    else:
        lib, bits, group = arg
        cmd = [peers_python, str(ROOT / "benchmarks" / "peers" / "quant_libs.py"), str(data), str(model_dir),
               str(work / f"{name}.json"), "--lib", lib, "--bits", str(bits), "--group-size", str(group),
               "--threads", str(threads)]
    return run_worker(name, cmd, env, work)


def adopt(name: str) -> dict | None:
    """A row the family benchmark already stored on this protocol, or None."""
    runner = ROWS[name][1]
    if runner not in ("lowrank", "pruning", "svdquant"):
        return None
    res = stored_row(RESULTS, name, (f"{runner}_rows",), key="adopted_from")
    return res if res is not None and res.get("scored_tokens") == SCORED_TOKENS else None


def param_ratio(r: dict) -> float | None:
    """Fraction of the dense decoder-linear storage kept, from bits per weight against fp32."""
    return None if r.get("bits_per_weight") is None else r["bits_per_weight"] / 32.0


def table(rows: list[dict]) -> list[str]:
    out = ["| family | row | tool | ppl | bits/weight | compress s | CPU s | peak RSS MB | run |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fam = FAMILY_TITLES.get(ROWS.get(r["row"], ("dense",))[0], "-")
        out.append(f"| {fam} | {r['row']} | {r.get('tool', '')} | {r['ppl']:.3f} | "
                   f"{fmt(r.get('bits_per_weight'), '{:.2f}')} | {fmt(r.get('compress_seconds'), '{}')} | "
                   f"{fmt(r.get('compress_cpu_seconds'), '{}')} | {fmt(r.get('peak_rss_mb'), '{}')} | "
                   f"{(r.get('date') or '-')[:10]} |")
    return out


def plots(rows: list[dict], out: Path, tag: str = "") -> list[str]:
    """Two PNGs; returns their names (none, with a message, when matplotlib is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    dense = next((r for r in rows if r["row"] == "dense"), None)
    made = []
    for fam, fname, xlabel, xof in (("quant", "compare-bits.png", "bits per weight (decoder linears)",
                                     lambda r: r.get("bits_per_weight")),
                                    ("lowrank", "compare-lowrank.png", "parameters kept (fraction of dense)",
                                     param_ratio)):
        pts = [r for r in rows if ROWS.get(r["row"], ("",))[0] == fam and xof(r) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        tools = sorted({r.get("tool", "") for r in pts}, key=lambda t: (t != "tensorpress", t))
        for i, tool in enumerate(tools):
            sel = [r for r in pts if r.get("tool", "") == tool]
            ax.scatter([xof(r) for r in sel], [r["ppl"] for r in sel], label=tool, s=36,
                       marker="o" if tool == "tensorpress" else "osD^vP"[i % 6], zorder=3)
            for r in sel:
                ax.annotate(r["row"], (xof(r), r["ppl"]), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
        if dense:
            ax.axhline(dense["ppl"], color="grey", lw=0.8, ls="--", label=f"dense fp32 ({dense['ppl']:.2f})")
        ax.set_yscale("log")
        fmt_ppl = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt_ppl)
        ax.yaxis.set_minor_formatter(fmt_ppl if max(r["ppl"] for r in pts) / min(r["ppl"] for r in pts) < 20
                                     else matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (protocol, log scale)")
        ax.set_title(f"{FAMILY_TITLES[fam]} — {'SmolLM2-135M protocol' if not tag else tag[1:]}")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fname = fname.replace(".png", f"{tag}.png")
        fig.savefig(out / fname)
        plt.close(fig)
        made.append(fname)
    return made


def report(rows: list[dict], meta: dict, pngs: list[str]) -> list[str]:
    adopted = [r["row"] for r in rows if r.get("adopted_from")]
    lines = [f"Comparison, {meta['model']} — report {meta['date']}, {meta['machine']}, {meta['threads']} threads",
             "", *table(rows), ""]
    lines += [f"![{p}](benchmarks/results/{p})" for p in pngs]
    lines += ["", f"command: `{meta['command']}` (rows stored one file each in `benchmarks/results/compare_rows/`; "
              "the `run` column is each row's own date)",
              f"versions: {json.dumps(meta['versions'])}"]
    if adopted:
        lines.append(f"adopted from the family benchmarks (same protocol, same runner): {', '.join(adopted)}")
    lines += ["bits/weight: stored bits of the decoder linears per weight (scales, zeros, factors, indices; "
              "pruned rows stored dense count 32; llm-compressor GPTQ: its saved format, codes + fp16 scale per "
              "group; HQQ: scale and zero counted at 16 bits, as it serves them; bitsandbytes: fp32 absmax per "
              "64 block).",
              "compress s / CPU s: compression only (bitsandbytes: its quantising load); every row scored by the "
              "same perplexity function on the same windows.", *meta.get("notes", [])]
    return lines


def update_readme(block: list[str], readme: Path = ROOT / "README.md") -> bool:
    """Replace what lies between the README's two markers with ``block``; False when they are missing."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + README_BEGIN + "\n" + "\n".join(block) + "\n" + README_END + tail)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--reuse", action="store_true", help="keep rows already in benchmarks/results/compare_rows/")
    ap.add_argument("--adopt", action="store_true",
                    help="copy rows the family benchmarks stored on the same protocol instead of re-running them")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from the stored rows")
    ap.add_argument("--readme", action="store_true", help="also replace the README's results block")
    ap.add_argument("--note", action="append", default=[], help="a line added to the report (e.g. run conditions)")
    ap.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    ap.add_argument("--work", help="scratch directory (token file, shared Fisher); default: a new temp dir")
    ap.add_argument("--model", help="a local transformers model directory instead of the protocol's default model; "
                    "its rows, report and plots get its directory name as a suffix (no --adopt, no README)")
    ap.add_argument("--peers-python", default=os.environ.get("TENSORPRESS_PEERS_PYTHON", str(ROOT / ".venv-peers/bin/python")))
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    import torch
    from tensorpress import __version__, assets

    out = Path(a.out)
    tag = "" if a.model is None else "-" + Path(a.model).resolve().name
    if a.model and (a.adopt or a.readme):
        ap.error("--adopt and --readme are for the protocol's default model only")
    rows_dir = out / f"compare_rows{tag}"
    rows_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    if not a.report_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from tensorpress.evaluate import perplexity
        peers = [r for r in a.rows if ROWS[r][1] in ("llmc-gptq", "quantlib") or r.startswith(("llmc-", "gptqmodel-"))]
        if peers and not Path(a.peers_python).exists():
            print(f"error: peers environment not found at {a.peers_python} (run `make peers`)", file=sys.stderr)
            return 2
        model_dir = Path(a.model) if a.model else assets.default_model_dir()
        work = Path(a.work or tempfile.mkdtemp(prefix="tp-compare-"))
        work.mkdir(parents=True, exist_ok=True)
        data, windows = write_tokens(work, AutoTokenizer.from_pretrained(model_dir))
        dense_file = rows_dir / "dense.json"
        if not (a.reuse and dense_file.exists()):
            dense = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), windows,
                               progress=False)
            dense_file.write_text(json.dumps({"row": "dense", "tool": "dense fp32", "bits_per_weight": 32.0,
                                              "date": time.strftime("%Y-%m-%d %H:%M"), **dense}, indent=1))
        run_rows(a.rows, rows_dir, lambda name: run_row(name, data, model_dir, a.threads, a.peers_python, work),
                 reuse=a.reuse, stored=adopt if a.adopt else None,
                 finish=lambda name, res: with_format_bits(name, {**res, "row": name}, Path(model_dir)))

    order = ["dense"] + list(ROWS)
    rows = [json.loads((rows_dir / f"{n}.json").read_text()) for n in order if (rows_dir / f"{n}.json").exists()]
    import transformers
    peer_versions = {}
    for r in rows:
        for k, v in (r.get("versions") or {}).items():
            if k not in ("torch", "transformers"):
                peer_versions[k] = v
            elif r.get("tool") not in (None, "tensorpress"):
                peer_versions[f"peer {k}"] = v
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
            "command": "python benchmarks/compare.py " + " ".join(public_args(argv)),
            "protocol": {"calibration": [128, 512], "eval_windows": [40, 512]},
            "versions": {"tensorpress": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, **dict(sorted(peer_versions.items()))},
            "notes": a.note}
    missing = [n for n in ROWS if n not in {r["row"] for r in rows}]
    if missing:
        meta["notes"] = meta["notes"] + [f"not run yet: {', '.join(missing)}"]
    meta["model"] = Path(a.model).resolve().name if a.model else "SmolLM2-135M-Instruct (protocol)"
    pngs = plots(rows, out, tag)
    (out / f"compare{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows, "plots": pngs}, indent=2))
    lines = report(rows, meta, pngs)
    (out / f"compare{tag}.md").write_text("\n".join(lines).replace("](benchmarks/results/", "](") + "\n")
    if a.readme and not update_readme(lines):
        print(f"README.md has no {README_BEGIN} … {README_END} block: not updated", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
