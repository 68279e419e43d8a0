"""Ahead-of-time compilation of every config-table row for sm_80 / sm_90, on a machine without a GPU.

The interpreter accepts things the GPU compiler rejects (``tl.dot`` with K < 16, int8 dots with
K < 32 on Triton 3.6, layouts that do not fit shared memory). This compiles the exact launches the
runtime would issue (same host code, CPU placeholder tensors) with ``triton.compile`` for a
``GPUTarget`` and reports PTX size, shared memory, registers and spills::

    python -m tensorpress.kernels.aot --target 90 --target 80 [--json out.json]

Must run with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled); the exit code is
non-zero when any variant fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from . import _env, configs

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _variants(cc: int):
    """(label, Launch) for every table row of ``sm{cc}0`` × a few feature sets per kernel."""
    from . import lowrank, sparse24, testing, w4a8, w4a16
    key = f"sm{cc}0"
    tab = configs.table(key)
    n = k = 512
    half = [torch.float16, torch.bfloat16] if cc >= 90 else [torch.float16]

    def layer(dtype, **kw):
        return testing.random_w4(n, k, kw.pop("group", 128), dtype=dtype, **kw)

    lim = configs.thresholds(key)
    for kernel, rows in tab.items():
        for i, (max_m, cfg) in enumerate(rows):
            m = min(max_m, 64)
            min_m = rows[i - 1][0] + 1 if i else 1               # the smallest M this row serves
            for dtype in half:
                full = dtype == torch.float16        # fp16: every epilogue; bf16: act-order, plain
                x = torch.zeros(m, k, dtype=dtype)
                tag = f"{kernel}[{i}] {str(dtype)[6:]}"
                if kernel in ("w4a16_gemv", "w4a16_gemm"):
                    path = kernel[6:]
                    if full:     # fused low-rank (one launch) at ranks 32 and 64, default and atomic split-K,
                        fused = ((32, {}), (64, {"REDUCE": "atomic"}), (64, {"SPLIT_K": 1}))   # where dispatched
                        for rank, over in fused if min_m <= lim["lr_fused_max_m"] else ():
                            L = layer(dtype, rank=rank, bias=True)
                            la = w4a16.matmul_launch(x, L["qweight"], L["scales"], L["qzeros"], None, 128, L["bias"],
                                                     None, L["lr_up"], path, {**cfg, **over}, down=L["lr_down"])
                            yield f"{tag} lr=fused r={rank} reduce={la.consts['REDUCE']}", la
                        L = layer(dtype, rank=128, bias=True)     # high rank or M: precomputed t
                        t = torch.zeros(4, m, 128)
                        la = w4a16.matmul_launch(x, L["qweight"], L["scales"], L["qzeros"], None, 128, L["bias"], t,
                                                 L["lr_up"], path, cfg)
                        yield f"{tag} lr=t r=128 reduce={la.consts['REDUCE']}", la
                    else:        # bf16 (sm_90): the benchmark's decode target, fused rank 32; act-order
                        if min_m <= lim["lr_fused_max_m"]:
                            L = layer(dtype, rank=32, bias=True)
                            la = w4a16.matmul_launch(x, L["qweight"], L["scales"], L["qzeros"], None, 128, L["bias"],
                                                     None, L["lr_up"], path, cfg, down=L["lr_down"])
                            yield f"{tag} lr=fused r=32 reduce={la.consts['REDUCE']}", la
                        L = layer(dtype, act_order=True)
                        for over in ({}, {"REDUCE": "atomic"}):
                            la = w4a16.matmul_launch(x, L["qweight"], L["scales"], L["qzeros"], L["g_idx"], 128,
                                                     None, None, None, path, {**cfg, **over})
                            yield f"{tag} act-order reduce={la.consts['REDUCE']}", la
                elif kernel == "w4_dequant":
                    L = layer(dtype, act_order=not full)
                    yield tag, w4a16.dequantize_launch(L["qweight"], L["scales"], L["qzeros"], L["g_idx"], 128, k,
                                                       dtype, cfg)
                elif kernel == "lr_down":
                    yield tag, lowrank.down_launch(x, torch.zeros(32 if full else 64, k, dtype=dtype), cfg)
                elif kernel == "lr_up":
                    t = torch.zeros(2, m, 32)
                    yield tag, lowrank.up_launch(t, torch.zeros(n, 32, dtype=dtype),
                                                 torch.zeros(n, dtype=dtype) if full else None, dtype, cfg)
                elif kernel == "lr_fused":
                    for r, over in ((32, {}), (512, {}), (512, {"REDUCE": "atomic"})) if full else ((64, {}),):
                        la = lowrank.fused_launch(x, torch.zeros(r, k, dtype=dtype), torch.zeros(n, r, dtype=dtype),
                                                  torch.zeros(n, dtype=dtype) if full else None, {**cfg, **over})
                        yield f"{tag} r={r} reduce={la.consts['REDUCE']}", la
                elif kernel == "act_quant":     # per token over several tiles (two passes), groups of 64 (one)
                    for ag in (-1, 64):
                        la = w4a8.act_quant_launch(x, torch.ones(k) if full else None,
                                                   torch.zeros(32, k, dtype=dtype) if full else None, ag, cfg)
                        yield f"{tag} ag={ag} {'one' if la.consts['ONE_PASS'] else 'two'}-pass", la
                elif kernel == "w4a8_gemm":
                    L = layer(dtype, rank=32 if full else 0, bias=full)
                    q = torch.zeros(m, k, dtype=torch.int8)
                    t = torch.zeros(1, m, 32) if full else None
                    for ag in (64, -1) if full else (64,):                  # per-group and per-token scales
                        sx = torch.zeros(m, k // 64 if ag == 64 else 1)
                        yield f"{tag} ag={ag}", w4a8.gemm_launch(q, sx, L["qweight"], L["scales"], L["qzeros"], 128,
                                                                 ag, dtype, L["bias"], t, L["lr_up"], cfg)
                elif kernel == "sparse24_gemv":
                    for armor in ((0, 128) if full else (64,)):
                        S = testing.random_24(n, k, armor=armor, bias=full, dtype=dtype)
                        yield f"{tag} armor={armor}", sparse24.gemv_launch(x, S["values"], S["meta"], S["bias"],
                                                                           S["armor_a"], cfg)
                elif kernel == "blockdiag":
                    b = 64 if full else 128
                    yield f"{tag} b={b}", sparse24.blockdiag_launch(x, torch.zeros(k // b, b, b, dtype=dtype), cfg)
                else:
                    raise KeyError(f"aot.py has no example problem for kernel {kernel!r}")


def _signature(launch):
    fn = launch.kernel
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.consts:
            sig[name] = "constexpr"
            consts[(i,)] = launch.consts[name]
            continue
        v = launch.args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]   # torch allocations are 16-byte aligned
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _resources(cubin: bytes) -> dict:
    """Registers / spill stack from the cuobjdump bundled with Triton (empty dict if unavailable)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def compile_launch(launch, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts, attrs = _signature(launch)
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    ptx = c.asm["ptx"]
    return {"ptx_bytes": len(ptx), "shared": c.metadata.shared, "wgmma": "wgmma" in ptx,
            "mma": "mma.sync" in ptx or "wgmma" in ptx, **_resources(c.asm["cubin"])}


def run(targets) -> list[dict]:
    if _env.interpreting():
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    results = []
    for cc in targets:
        _env.aot_target = (cc // 10, cc % 10)
        try:
            for label, launch in _variants(cc):
                t0 = time.perf_counter()
                rec = {"target": f"sm_{cc}", "variant": label, "kernel": launch.kernel.__name__,
                       "num_warps": launch.num_warps, "num_stages": launch.num_stages}
                try:
                    rec.update(compile_launch(launch, cc))
                    rec["ok"] = rec["shared"] <= SMEM_LIMIT.get(cc, 99 * 1024)
                except Exception as e:          # report every failure, not just the first
                    rec.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                results.append(rec)
        finally:
            _env.aot_target = None
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=int, action="append", help="compute capability ×10, e.g. 90 (repeatable)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    results = run(a.target or [90, 80])
    for r in results:
        extra = r.get("error") or " ".join(f"{k}={r[k]}" for k in ("shared", "regs", "stack", "wgmma") if k in r)
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['target']} {r['variant']:<34} w{r['num_warps']} s{r['num_stages']} "
              f"{r['seconds']:5.1f}s {extra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
