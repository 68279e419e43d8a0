"""Kernel configurations: an explicit table per device plus a heuristic fallback (no autotuning).

``@triton.autotune`` cannot run without a GPU (and tuning inside a CUDA-graph capture is a trap), so
block sizes come from :data:`TABLE`: per device key (``sm90``, ``sm80``, ``interpret``) and kernel, a
list of ``(max_m, config)`` rows; the first row whose ``max_m >= M`` wins. ``SPLIT_K`` left out (or
0) is chosen by :func:`split_k` to give every SM a few programs. Block sizes that must fit the
problem (BLOCK_K vs the quantisation group, BLOCK_N vs the ARMOR block, BLOCK_R vs the rank) are
adapted by the launch code. A JSON file named by ``TENSORPRESS_KERNEL_CONFIGS``, shaped
``{"sm90": {"w4a16_gemv": [[max_m, {...}], ...], "thresholds": {"gemv_max_m": 1, ...}}}``,
replaces whole kernel entries and thresholds (e.g. after tuning on a GPU).

The GPU rows are design-time choices, not yet measured (docs/kernels.md §3.4: BLOCK_K dividing the
group, loads along N, split-K for decode); each is compiled for sm_80 and sm_90 by
``tests/kernels/test_aot.py`` (no spills, shared memory within limits).
Pure Python: importable without Triton.
"""
from __future__ import annotations

import functools
import json
import math
import os

BIG = 1 << 62

# Batch-size dispatch thresholds (rows of x). W4A16: GEMV up to ``gemv_max_m``, tl.dot GEMM up to
# ``fused_max_m``, then Triton dequantise + cuBLAS (backend ``auto`` only). Low-rank: Triton up to
# ``lowrank_max_m``, then two cuBLAS GEMMs. 2:4: Triton GEMV up to ``sparse_max_m``, then PyTorch
# semi-structured (cuSPARSELt / CUTLASS) where the shape allows.
# W4A16 low-rank corrections up to rank ``lr_fused_max_rank`` and M ≤ ``lr_fused_max_m`` are computed
# inside the W4A16 kernel (one launch, x read once). The fused form recomputes its share of x·downᵀ in
# every output tile (R/BLOCK_N more MMA work), free while the kernel is memory-bound (W4A16 on an H100
# turns compute-bound near M ≈ 61–76, docs/kernels.md §2.2) but not above; higher ranks or M use the
# down-projection kernel + epilogue. Plain low-rank runs as one fused launch up to M ≤
# ``lowrank_fused_max_m`` and rank ≤ ``lowrank_fused_max_rank``: every output tile recomputes its
# x·downᵀ, re-reading ``down`` (R·K elements) from L2 once per tile, which stops paying for the saved
# launch as R grows; above, two kernels (or two cuBLAS GEMMs past ``lowrank_max_m`` under ``auto``).
THRESHOLDS = {"gemv_max_m": 1, "fused_max_m": 128, "lowrank_max_m": 16, "sparse_max_m": 8,
              "lr_fused_max_rank": 64, "lr_fused_max_m": 64, "lowrank_fused_max_m": 16,
              "lowrank_fused_max_rank": 128}

_GPU = {
    "w4a16_gemv": [(BIG, dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=2))],
    "w4a16_gemm": [(16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)),
                   (64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)),
                   (BIG, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3))],
    "w4_dequant": [(BIG, dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1))],
    "lr_down": [(16, dict(BLOCK_M=16, BLOCK_R=64, BLOCK_K=128, num_warps=4, num_stages=2)),
                (BIG, dict(BLOCK_M=64, BLOCK_R=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=3))],
    "lr_up": [(16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=64, num_warps=4, num_stages=2)),
              (BIG, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=64, num_warps=4, num_stages=3))],
    "lr_fused": [(BIG, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, BLOCK_R=64, num_warps=4, num_stages=3))],
    "act_quant": [(BIG, dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=2))],
    "w4a8_gemm": [(64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)),
                  (BIG, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))],
    "sparse24_gemv": [(BIG, dict(BLOCK_N=64, BLOCK_J=64, num_warps=4, num_stages=2))],
    "blockdiag": [(BIG, dict(BLOCK_M=16, num_warps=4, num_stages=1))],
}

# Interpreter: cost is per program and per op, so big blocks; still smaller than the test shapes
# so that masks, tails and split-K are exercised.
_INTERPRET = {
    "w4a16_gemv": [(BIG, dict(BLOCK_N=64, BLOCK_K=64))],
    "w4a16_gemm": [(BIG, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32))],
    "w4_dequant": [(BIG, dict(BLOCK_N=64, BLOCK_K=64))],
    "lr_down": [(BIG, dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=64))],
    "lr_up": [(BIG, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=32))],
    "lr_fused": [(BIG, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=32))],
    "act_quant": [(BIG, dict(BLOCK_M=16, BLOCK_K=64))],
    "w4a8_gemm": [(BIG, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32))],
    "sparse24_gemv": [(BIG, dict(BLOCK_N=64, BLOCK_J=64))],
    "blockdiag": [(BIG, dict(BLOCK_M=16))],
}

TABLE: dict[str, dict[str, list[tuple[int, dict]]]] = {"sm90": _GPU, "sm80": _GPU, "interpret": _INTERPRET}
KERNELS = tuple(_GPU)


@functools.cache
def _overrides(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def table(device_key: str) -> dict[str, list[tuple[int, dict]]]:
    rows = dict(TABLE.get(device_key, _GPU))
    path = os.environ.get("TENSORPRESS_KERNEL_CONFIGS")
    if path and device_key != "interpret":
        over = _overrides(path).get(device_key, {})
        rows.update({k: [(int(m), dict(c)) for m, c in v] for k, v in over.items() if k in KERNELS})
    return rows


def thresholds(device_key: str) -> dict[str, int]:
    path = os.environ.get("TENSORPRESS_KERNEL_CONFIGS")
    over = _overrides(path).get(device_key, {}).get("thresholds", {}) if path else {}
    return {**THRESHOLDS, **over}


def select(kernel: str, device_key: str, m: int) -> dict:
    """Config row for ``kernel`` at batch ``m`` (a fresh dict the caller may adapt)."""
    for max_m, cfg in table(device_key)[kernel]:
        if m <= max_m:
            return dict(cfg)
    raise LookupError(f"no {kernel} config for M={m}")


def split_k(tiles: int, k_blocks: int, sms: int, waves: int = 4, min_blocks: int = 2) -> int:
    """Split the K loop so that ``tiles × split`` fills ~``waves`` programs per SM, keeping at least
    ``min_blocks`` BLOCK_K steps per split (decode GEMVs have too few N tiles to fill an H100)."""
    want = math.ceil(waves * sms / max(tiles, 1))
    return max(1, min(want, k_blocks // min_blocks))


def pow2_block_k(block_k: int, group: int, minimum: int) -> int:
    """Largest power of two ``<= block_k`` dividing ``group`` (so a tile holds one group), or
    ``block_k`` unchanged if that would fall below ``minimum`` (then scales are gathered per row)."""
    b = block_k
    while b >= minimum and group % b:
        b //= 2
    return b if b >= minimum else block_k


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
