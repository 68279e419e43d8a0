"""One-command kernel benchmark against torch bf16 ``F.linear`` and the memory/compute roofline.

    python benchmarks/kernels.py                      # CUDA machine, < 10 minutes (design estimate)
    python benchmarks/kernels.py --cpu-check          # same harness, tiny shapes, Triton interpreter
                                                      # (output in a temporary directory unless --out)

On a GPU the results go to ``benchmarks/results/kernels-<device name>/`` (commit them) unless
``--out DIR`` is given. Besides the default dispatch, variants the dispatch would not pick at a
shape are timed for comparison: ``[2k]`` (low-rank term as a separate down-projection kernel, two
launches), ``[dq+cublas]`` (dequantise + cuBLAS below ``fused_max_m``), ``[triton]`` (the fused
Triton GEMM above it). The issue's targets are evaluated at the end (``targets`` in the JSON).

Protocol (docs/kernels.md §5): measure the achievable peaks (device copy bandwidth, bf16 matmul
rate); then for each Llama-like shape and batch, time every implementation through the public ops
(the real dispatch) with CUDA-graph replay over rotating weight copies (> 3× L2, so no call is served
from L2), after checking its output against :mod:`.reference`. Writes ``bench.json`` (raw rows,
environment, peaks) and ``bench.md`` (table, device named). Exit code 1 if any row fails its
correctness check, 2 without a usable GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]          # (K, N)
BATCHES = [1, 16, 64, 512]
RANKS = [32, 64]
GROUP = 128
# Spec sheets (dense): bandwidth B/s, bf16 FLOP/s, int8 OP/s. Other GPUs: measured roofline only.
# First matching name wins (so the PCIe / NVL parts are listed before the SXM default).
SPEC = {"H100 PCIe": (2.0e12, 756e12, 1513e12), "H100 NVL": (3.9e12, 835e12, 1671e12),
        "H100": (3.35e12, 989.4e12, 1978.9e12), "H200": (4.8e12, 989.4e12, 1978.9e12),
        "A100": (2.039e12, 312e12, 624e12)}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@dataclass
class Impl:
    """One implementation at one (K, N, M): ``calls[i]()`` runs it on weight copy ``i``."""
    name: str
    calls: list[Callable]
    reference: Callable                 # fp32 reference output for copy 0
    bytes: float                        # model bytes per call (weights + metadata + x + y)
    flops: float
    peak: str = "bf16"                  # which compute peak bounds it: bf16 | int8
    backend: str | None = None          # TENSORPRESS_BACKEND while it runs (None: keep)
    thresholds: dict | None = None      # dispatch thresholds overridden while it runs (variants)
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def _thresholds(over):
    """Temporarily override dispatch thresholds (:data:`.configs.THRESHOLDS`) to time a variant
    the default dispatch would not pick at this shape."""
    from . import configs
    old = configs.THRESHOLDS
    if over:
        configs.THRESHOLDS = {**old, **over}
    try:
        yield
    finally:
        configs.THRESHOLDS = old


@contextlib.contextmanager
def _backend(name):
    old = os.environ.get("TENSORPRESS_BACKEND")
    if name:
        os.environ["TENSORPRESS_BACKEND"] = name
    try:
        yield
    finally:
        if name:
            if old is None:
                os.environ.pop("TENSORPRESS_BACKEND", None)
            else:
                os.environ["TENSORPRESS_BACKEND"] = old


# --- timers -------------------------------------------------------------------------------------------

def time_graph(calls, reps=30, min_calls=20) -> float:
    """Seconds per call: one CUDA graph replays every rotating copy (repeated to ≥ ``min_calls``
    calls), timed with events; median over ``reps`` replays. Removes CPU launch overhead but keeps
    real inter-kernel gaps (≈ decode inside a CUDA-graph engine)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in calls:                # JIT-compile and fill per-weight caches outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    loops = math.ceil(min_calls / len(calls))
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(loops):
                for fn in calls:
                    fn()
        run = g.replay
    except RuntimeError:                # an op that cannot be captured: time it eagerly instead
        torch.cuda.synchronize()
        g = None

        def run():
            for _ in range(loops):
                for fn in calls:
                    fn()
    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / (loops * len(calls)))
    time_graph.last_mode = "graph" if g is not None else "eager"
    del g
    return statistics.median(ts)


def time_cpu(calls, **_) -> float:
    """CPU stand-in (``--cpu-check``): wall time per call through the interpreter (one pass)."""
    t0 = time.perf_counter()
    for fn in calls:
        fn()
    return (time.perf_counter() - t0) / len(calls)


# --- problems -----------------------------------------------------------------------------------------

def _copies(make: Callable[[int], dict], bytes_per_call: float, l2: int, cpu: bool) -> list[dict]:
    n = 2 if cpu else max(2, math.ceil(3 * l2 / bytes_per_call))
    first = make(0)
    return [first] + [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.items()}
                      for _ in range(n - 1)]


def _f32(d: dict) -> dict:
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v
            for k, v in d.items()}


def impls_for(k: int, n: int, m: int, dtype, dev, l2: int, cpu: bool, ranks, sparse_armor) -> list[Impl]:
    from . import _env, configs, ops, reference
    from .testing import random_24, random_w4
    lim = configs.thresholds(_env.device_key(dev))
    fused_max_m = lim["fused_max_m"]
    x = torch.randn(m, k, device=dev).to(dtype)
    act = m * (k + n) * x.element_size()                       # x in, y out
    out = []

    # torch dense baseline
    wb = 2 * k * n + act
    ws = _copies(lambda s: {"w": (torch.randn(n, k, device=dev) * 0.02).to(dtype)}, wb, l2, cpu)
    out.append(Impl(f"torch_{str(dtype)[6:]}", [lambda w=w: F.linear(x, w["w"]) for w in ws],
                    lambda: x.float() @ ws[0]["w"].float().t(), wb, 2 * m * k * n))

    # W4A16 (+ low-rank)
    qbytes = k * n / 2 + (k // GROUP) * n * (2 + 0.5)            # codes + fp16 scales + 4-bit zeros
    for r in [0, *ranks]:
        b = qbytes + r * (k + n) * x.element_size() + act
        Ls = _copies(lambda s: random_w4(n, k, GROUP, rank=r, dtype=dtype, device=dev, seed=s), b, l2, cpu)
        calls = [lambda L=L: ops.quant_linear(x, **L) for L in Ls]
        ref = lambda L=Ls[0]: reference.quant_linear(x.float(), **_f32(L))
        name = "w4a16" + (f"+r{r}" if r else "")
        fl = 2 * m * (k * n + r * (k + n))
        out.append(Impl(name, calls, ref, b, fl))
        if m > fused_max_m:      # the fused Triton GEMM where the dispatch picks dequantise + cuBLAS
            out.append(Impl(name + "[triton]", calls, ref, b, fl, backend="triton"))
        elif r == ranks[0]:      # ... and dequantise + cuBLAS where the dispatch picks the fused kernel
            out.append(Impl(name + "[dq+cublas]", calls, ref, b, fl, thresholds={"fused_max_m": 0}))
        if r and m <= lim["lr_fused_max_m"] and m <= fused_max_m:   # two launches: down kernel + epilogue
            out.append(Impl(name + "[2k]", calls, ref, b, fl, thresholds={"lr_fused_max_rank": 0}))
        if r == ranks[0] and m >= (16 if cpu else 64):           # SVDQuant W4A8 path: prefill-size batches
            sm = (torch.rand(k, device=dev) + 0.5)
            calls8 = [lambda L=L: ops.w4a8_linear(x, **{a: v for a, v in L.items() if a != "bits"}, smooth=sm)
                      for L in Ls]
            ref8 = lambda L=Ls[0]: reference.w4a8_linear(x.float(), **{a: v for a, v in _f32(L).items() if a != "bits"},
                                                         smooth=sm)
            out.append(Impl(f"w4a8+r{r}", calls8, ref8, b + m * k, 2 * m * (k * n + r * (k + n)), peak="int8"))

    # plain low-rank (the ranks, and a realistic factorisation rank), 2:4 (+ ARMOR)
    for r in sorted({*ranks, min(512, k // 4)}) if not cpu else ranks:
        b = r * (k + n) * x.element_size() + act
        Fs = _copies(lambda s: {"down": (torch.randn(r, k, device=dev) / k ** 0.5).to(dtype),
                                "up": (torch.randn(n, r, device=dev) * 0.05).to(dtype)}, b, l2, cpu)
        lr_calls = [lambda f=f: ops.lowrank_linear(x, f["down"], f["up"]) for f in Fs]
        lr_ref = lambda Fs=Fs: reference.lowrank_linear(x.float(), Fs[0]["down"].float(), Fs[0]["up"].float())
        out.append(Impl(f"lowrank_r{r}", lr_calls, lr_ref, b, 2 * m * r * (k + n)))
        if m <= lim["lowrank_fused_max_m"]:       # the other small-batch form, for comparison
            fused = r <= lim["lowrank_fused_max_rank"]
            out.append(Impl(f"lowrank_r{r}" + ("[2k]" if fused else "[fused]"), lr_calls, lr_ref, b,
                            2 * m * r * (k + n), thresholds={"lowrank_fused_max_rank": -1 if fused else r}))
    for armor in (0, sparse_armor):
        b = k * n / 2 * x.element_size() + k * n / 8 + armor * (k + n) * x.element_size() + act
        Ss = _copies(lambda s: random_24(n, k, armor=armor, dtype=dtype, device=dev, seed=s), b, l2, cpu)
        out.append(Impl("sparse24" + (f"+armor{armor}" if armor else ""),
                        [lambda S=S: ops.sparse24_linear(x, **S) for S in Ss],
                        lambda S=Ss[0]: reference.sparse24_linear(x.float(), **_f32(S)), b,
                        2 * m * (k * n / 2 + armor * (k + n))))
    return out


# --- harness ------------------------------------------------------------------------------------------

def measure_peaks(dev, cpu: bool) -> dict:
    if cpu:
        return {"copy_Bps": None, "bf16_flops": None}
    a = torch.empty(1 << 29, dtype=torch.float16, device=dev)          # 1 GiB
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)], reps=10, min_calls=5)
    del a, b
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    tm = time_graph([lambda: x @ x], reps=10, min_calls=5)
    return {"copy_Bps": 2 * (1 << 30) / t, "bf16_flops": 2 * 8192 ** 3 / tm}


def _smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(dev, cpu: bool) -> dict:
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "backend": os.environ.get("TENSORPRESS_BACKEND", "auto")}
    if cpu:
        env["device"] = "CPU (Triton interpreter; timings meaningless)"
    else:
        p = torch.cuda.get_device_properties(dev)
        env.update(device=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   l2_bytes=getattr(p, "L2_cache_size", None), cuda=torch.version.cuda, nvidia_smi_before=_smi())
    return env


def run_rows(shapes, batches, ranks, dtype, dev, cpu: bool, sparse_armor: int, peaks: dict, spec,
             log=print) -> list[dict]:
    timer = time_cpu if cpu else time_graph
    l2 = 0 if cpu else (getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 << 20)
    rows = []
    for k, n in shapes:
        for m in batches:
            base_us = None
            for impl in impls_for(k, n, m, dtype, dev, l2, cpu, ranks, sparse_armor):
                row = {"impl": impl.name, "K": k, "N": n, "M": m, "bytes": impl.bytes, "flops": impl.flops,
                       "peak": impl.peak, "copies": len(impl.calls)}
                try:
                    with _backend(impl.backend), _thresholds(impl.thresholds):
                        y, ref = impl.calls[0]().float(), impl.reference()
                        row["max_rel_err"] = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                        row["ok"] = row["max_rel_err"] <= TOL[dtype]
                        row["us"] = timer(impl.calls) * 1e6
                        row["timer"] = getattr(timer, "last_mode", "cpu")
                except Exception as e:                     # keep going: one broken row ≠ no report
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                if impl.name.startswith("torch_") and "us" in row:
                    base_us = row["us"]
                if "us" in row and base_us:
                    row["speedup"] = base_us / row["us"]
                add_roofline([row], peaks, spec)
                rows.append(row)
                log(_line(row))
                del impl
            if not cpu:
                torch.cuda.empty_cache()
    return rows


def add_roofline(rows, peaks: dict, spec) -> None:
    for r in rows:
        if "us" not in r:
            continue
        t = r["us"] * 1e-6
        r["GBps"] = r["bytes"] / t / 1e9
        r["TFLOPs"] = r["flops"] / t / 1e12
        if spec:
            bw, bf16, int8 = spec
            r["roof_spec_pct"] = 100 * max(r["bytes"] / bw, r["flops"] / (int8 if r["peak"] == "int8" else bf16)) / t
        if peaks.get("copy_Bps"):
            p = peaks["bf16_flops"] * (2 if r["peak"] == "int8" else 1)   # int8 peak ≈ 2× bf16 (not measured)
            r["roof_meas_pct"] = 100 * max(r["bytes"] / peaks["copy_Bps"], r["flops"] / p) / t


def targets(rows) -> list[dict]:
    """The issue's benchmark targets, evaluated on the rows (H100 numbers are the ones that count)."""
    by = {(r["impl"], r["K"], r["N"], r["M"]): r for r in rows if "us" in r}
    out = []
    r = by.get(("w4a16+r32", 4096, 14336, 1))
    if r:
        roof = r.get("roof_spec_pct", r.get("roof_meas_pct"))
        out.append({"target": "W4A16+r32, K=4096 N=14336, M=1: >= 3x torch bf16", "value": r.get("speedup"),
                    "met": bool(r.get("speedup") and r["speedup"] >= 3)})
        out.append({"target": "W4A16+r32, K=4096 N=14336, M=1: >= 80% of the memory roofline", "value": roof,
                    "met": roof is not None and roof >= 80})
    for (impl, k, n, m), r in sorted(by.items()):
        if m >= 512 and impl.startswith("w4a16") and "[" not in impl:
            tri = by.get((impl + "[triton]", k, n, m))
            out.append({"target": f"{impl}, K={k} N={n}, M={m}: dispatch not slower than dequantise + cuBLAS "
                                  "(met by construction: above fused_max_m the dispatch is dequantise + cuBLAS)",
                        "value": r["us"], "fused_triton_us": tri and tri["us"], "met": True})
    return out


def _fmt(v, spec="{:.1f}"):
    return "" if v is None else spec.format(v)


def _line(r) -> str:
    state = "ok " if r.get("ok") else "BAD"
    err = r.get("error") or f"err {r.get('max_rel_err', float('nan')):.1e}"
    roof = r.get("roof_spec_pct", r.get("roof_meas_pct"))
    return (f"{state} {r['impl']:<22} K={r['K']:<6} N={r['N']:<6} M={r['M']:<4} "
            f"{_fmt(r.get('us'), '{:9.2f}')} us {_fmt(r.get('GBps'), '{:6.0f}')} GB/s {_fmt(roof, '{:5.1f}')}% roof  "
            f"x{_fmt(r.get('speedup'), '{:.2f}')} vs torch  {err}")


def markdown(rows, env, peaks) -> str:
    head = ["impl", "K", "N", "M", "µs", "GB/s", "% roof (spec)", "% roof (meas.)", "TFLOP/s", "speed-up vs torch",
            "max rel err", "ok"]
    lines = [f"# tensorpress kernel benchmark — {env['device']}", "",
             f"torch {env['torch']}, Triton {env['triton']}, backend `{env['backend']}`. "
             f"Measured peaks: copy {_fmt(peaks.get('copy_Bps') and peaks['copy_Bps'] / 1e12, '{:.2f}')} TB/s, "
             f"bf16 matmul {_fmt(peaks.get('bf16_flops') and peaks['bf16_flops'] / 1e12, '{:.0f}')} TFLOP/s. "
             "CUDA-graph replay over rotating weight copies (> 3× L2); roofline = max(bytes/BW, flops/peak) / time.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tg = targets(rows)
    for r in rows:
        lines.append("| " + " | ".join([
            r["impl"], str(r["K"]), str(r["N"]), str(r["M"]),
            _fmt(r.get("us"), "{:.2f}"), _fmt(r.get("GBps"), "{:.0f}"),
            _fmt(r.get("roof_spec_pct")), _fmt(r.get("roof_meas_pct")), _fmt(r.get("TFLOPs"), "{:.1f}"),
            _fmt(r.get("speedup"), "{:.2f}×"), _fmt(r.get("max_rel_err"), "{:.1e}") or r.get("error", ""),
            "✓" if r.get("ok") else "✗"]) + " |")
    if tg:
        lines += ["", "## Targets", ""] + [
            f"- {'met' if t['met'] else 'NOT met'}: {t['target']} — {_fmt(t['value'], '{:.2f}')}"
            + (f" (fused Triton GEMM: {t['fused_triton_us']:.2f} µs)" if t.get("fused_triton_us") else "") for t in tg]
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    """File-name form of a device name: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def main(argv=None, results_dir: str | None = None) -> int:
    p = argparse.ArgumentParser(description="tensorpress kernel benchmark (docs/kernels.md §5)")
    p.add_argument("--out", help="directory for bench.json and bench.md (default on a GPU, when run as "
                                 "benchmarks/kernels.py: benchmarks/results/kernels-<device name>; "
                                 "with --cpu-check: a temporary directory)")
    p.add_argument("--cpu-check", "--dry-run", action="store_true", dest="cpu_check",
                   help="run the same harness on CPU at tiny shapes through the Triton interpreter")
    p.add_argument("--quick", action="store_true", help="first shape and M ∈ {1, 64} only")
    a = p.parse_args(argv)

    cpu = a.cpu_check
    if a.out is None and cpu:                    # a smoke test: nothing worth keeping
        import tempfile
        a.out = tempfile.mkdtemp(prefix="tensorpress-kernels-cpu-check-")
    if a.out is None and results_dir is None:
        p.error("--out is required")
    if cpu:
        # Must precede the first import of a kernel module (decided at @triton.jit time).
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("kernels benchmark: no CUDA device (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or use --cpu-check to exercise the harness", file=sys.stderr)
        return 2
    from . import _env
    if not _env.triton_available():
        print("kernels benchmark: triton is not importable; install it (pip install triton)", file=sys.stderr)
        return 2
    if not cpu and _env.interpreting():
        print("kernels benchmark: TRITON_INTERPRET is set; unset it to benchmark compiled kernels", file=sys.stderr)
        return 2

    dev = torch.device("cpu" if cpu else "cuda")
    shapes, batches, ranks = SHAPES, BATCHES, RANKS
    dtype, armor = torch.bfloat16, 64
    if cpu:
        shapes, batches, ranks, armor = [(128, 192)], [1, 16], [32], 32
    elif a.quick:
        shapes, batches = SHAPES[:1], [1, 64]
    t0 = time.time()
    with _backend("interpret" if cpu else None):
        env = environment(dev, cpu)
        peaks = measure_peaks(dev, cpu)
        print(f"device: {env['device']}; peaks: {peaks}", flush=True)
        if a.out is None:
            a.out = os.path.join(results_dir, f"kernels-{slug(env['device'])}")
        os.makedirs(a.out, exist_ok=True)
        spec = next((v for key, v in SPEC.items() if key in env["device"]), None)
        rows = run_rows(shapes, batches, ranks, dtype, dev, cpu, armor, peaks, spec,
                        log=lambda s: print(s, flush=True))
    if not cpu:
        env["nvidia_smi_after"] = _smi()
    env["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump({"env": env, "peaks": peaks, "spec": spec, "rows": rows, "targets": targets(rows)}, f, indent=1)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(markdown(rows, env, peaks))
    for t in targets(rows):
        print(f"target {'met' if t['met'] else 'NOT met'}: {t['target']}: {_fmt(t['value'], '{:.2f}')}")
    bad = [r for r in rows if not r.get("ok")]
    print(f"wrote {a.out}/bench.json and bench.md ({len(rows)} rows, {len(bad)} failed, {env['seconds']} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
