"""W4A16 (+ fused low-rank epilogue) Triton kernels reading the GPTQ layout as stored (no repack).

``qweight int32 [ceil(K/8), N]``: input ``k`` sits in bits ``4·(k%8)`` of row ``k//8``, so every
load runs along N (coalesced). ``scales [G, N]``, ``qzeros int32 [G, ceil(N/8)]`` (actual zero
points), optional ``g_idx [K]``. ``y = x·dequant(W)ᵀ [+ t·upᵀ] [+ bias]`` where ``t = x·downᵀ`` comes
from :func:`lowrank.down` (fp32 partials, one per K-split of that kernel).

* GEMV (decode, M ≤ ``gemv_max_m``): split-K over a (N-tile, K-split, row) grid; a [BLOCK_K/8,
  BLOCK_N] tile of packed words is loaded once and its 8 nibbles are consumed one at a time
  (input rows ``k0 + 8i + j``), accumulating a 2-D fp32 tile that is reduced across K only once.
* GEMM (small/medium M): tl.dot on a dequantised [BLOCK_K, BLOCK_N] tile, split-K for few tiles.
* dequantise: writes ``W [K, N]`` in the activation dtype for cuBLAS (large M).

Split-K partials are atomically added into a zeroed output; only split 0 adds the epilogue.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _env, configs
from ._tl import (Launch, centered4, dequant4, dot_dtype, launch_opts, load_group, lowrank_up, lowrank_up_vec,
                  output)


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, t_ptr, up_ptr, y_ptr,
                       N, K, K_SPLIT, R, T_SPLITS,
                       stride_xm, stride_qk, stride_sg, stride_zg, stride_ts, stride_tm, stride_un, stride_ym,
                       GROUP: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_GIDX: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, ATOMIC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    BKP: tl.constexpr = BLOCK_K // 8                       # packed rows per tile
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.max_contiguous(tl.multiple_of(rn, BLOCK_N), BLOCK_N)
    rn2 = rn[None, :]
    nm2 = rn2 < N
    ri = tl.arange(0, BKP)
    acc = tl.zeros((BKP, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        rows = k0 // 8 + ri
        pw = tl.load(qw_ptr + rows[:, None] * stride_qk + rn2, mask=(rows[:, None] * 8 < K) & nm2, other=0,
                     eviction_policy="evict_first")
        if TILE_GROUP:                                     # BLOCK_K divides the group: one row of scales,
            # loaded at tile shape so that everything in the loop shares one register layout (a
            # [1, BLOCK_N] load gets its own, and Triton then shuffles the accumulator every nibble).
            s, zm = load_group(s_ptr, z_ptr, k0 // GROUP + 0 * ri[:, None], rn2, nm2, stride_sg, stride_zg)
            part = tl.zeros((BKP, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            kj = rows * 8 + j                              # input index of nibble j of each word
            km = kj < K
            xj = tl.load(x_ptr + m * stride_xm + kj, mask=km, other=0.0, eviction_policy="evict_last")
            xj = xj.to(tl.float32)[:, None]
            q = (pw >> (4 * j)) & 0xF
            if TILE_GROUP:
                part += xj * centered4(q, zm)              # the scale is applied once per tile, below:
            else:                                          # 2 instead of 3 FP ops per weight
                if HAS_GIDX:
                    g = tl.load(g_ptr + kj, mask=km, other=0)
                else:
                    g = kj // GROUP
                s, zm = load_group(s_ptr, z_ptr, g[:, None], rn2, km[:, None] & nm2, stride_sg, stride_zg)
                acc += xj * dequant4(q, s, zm)
        if TILE_GROUP:
            acc += part * s
    out = tl.sum(acc, axis=0)
    if pid_k == 0:
        if HAS_LR:
            out = lowrank_up_vec(out, t_ptr, up_ptr, m, rn, N, R, T_SPLITS, stride_ts, stride_tm, stride_un, BLOCK_R)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = y_ptr + m * stride_ym + rn
    if ATOMIC:
        tl.atomic_add(y, out.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, t_ptr, up_ptr, y_ptr,
                       M, N, K, K_SPLIT, R, T_SPLITS,
                       stride_xm, stride_qk, stride_sg, stride_zg, stride_ts, stride_tm, stride_un, stride_ym,
                       GROUP: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_GIDX: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, ATOMIC: tl.constexpr,
                       DOT: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.max_contiguous(tl.multiple_of(rn, BLOCK_N), BLOCK_N)
    rn2 = rn[None, :]
    nm2 = rn2 < N
    rk = tl.arange(0, BLOCK_K)
    shift = (rk % 8) * 4                                   # BLOCK_K and K_SPLIT are multiples of 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        kk = k0 + rk
        km = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & km[None, :], other=0.0)
        # Each packed word is loaded for its 8 rows (served by L1), giving the [BLOCK_K, BLOCK_N]
        # operand tl.dot wants without a register reshape.
        pw = tl.load(qw_ptr + (kk // 8)[:, None] * stride_qk + rn2, mask=km[:, None] & nm2, other=0)
        if TILE_GROUP:
            s, zm = load_group(s_ptr, z_ptr, k0 // GROUP, rn2, nm2, stride_sg, stride_zg)
        else:
            if HAS_GIDX:
                g = tl.load(g_ptr + kk, mask=km, other=0)
            else:
                g = kk // GROUP
            s, zm = load_group(s_ptr, z_ptr, g[:, None], rn2, km[:, None] & nm2, stride_sg, stride_zg)
        w = dequant4((pw >> shift[:, None]) & 0xF, s, zm)
        acc += tl.dot(x.to(DOT), w.to(DOT), input_precision=PREC)
    if pid_k == 0:
        if HAS_LR:
            acc = lowrank_up(acc, t_ptr, up_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
                             DOT, PREC, BLOCK_R)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn2, mask=nm2, other=0.0).to(tl.float32)
    y = y_ptr + rm[:, None] * stride_ym + rn2
    mask = (rm[:, None] < M) & nm2
    if ATOMIC:
        tl.atomic_add(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4_dequant_kernel(qw_ptr, s_ptr, z_ptr, g_ptr, w_ptr, N, K, stride_qk, stride_sg, stride_zg, stride_wk,
                       GROUP: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_GIDX: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``W[k, n] = s·(q − z)`` into ``w [K, N]`` (row-major, coalesced along N), for cuBLAS."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    BKP: tl.constexpr = BLOCK_K // 8
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn2 = rn[None, :]
    nm2 = rn2 < N
    rows = pid_k * BKP + tl.arange(0, BKP)
    pw = tl.load(qw_ptr + rows[:, None] * stride_qk + rn2, mask=(rows[:, None] * 8 < K) & nm2, other=0)
    if TILE_GROUP:
        s, zm = load_group(s_ptr, z_ptr, (pid_k * BLOCK_K) // GROUP + 0 * rows[:, None], rn2, nm2, stride_sg, stride_zg)
    for j in tl.static_range(8):
        kj = rows * 8 + j
        km = kj < K
        if not TILE_GROUP:
            if HAS_GIDX:
                g = tl.load(g_ptr + kj, mask=km, other=0)
            else:
                g = kj // GROUP
            s, zm = load_group(s_ptr, z_ptr, g[:, None], rn2, km[:, None] & nm2, stride_sg, stride_zg)
        w = dequant4((pw >> (4 * j)) & 0xF, s, zm)
        tl.store(w_ptr + kj[:, None] * stride_wk + rn2, w.to(w_ptr.dtype.element_ty), mask=km[:, None] & nm2)


KERNELS = [_w4a16_gemv_kernel, _w4a16_gemm_kernel, _w4_dequant_kernel]


def _group(group_size: int, k: int) -> int:
    return k if group_size == -1 else group_size


def _group_consts(group: int, block_k: int, g_idx) -> dict:
    return dict(GROUP=group, TILE_GROUP=g_idx is None and group % block_k == 0, HAS_GIDX=g_idx is not None)


def matmul_launch(x, qweight, scales, qzeros, g_idx, group_size, bias=None, t=None, up=None,
                  path="gemm", cfg=None) -> Launch:
    """Launch record for ``y = x·dequant(W)ᵀ [+ t·upᵀ] [+ bias]``; ``x [M, K]`` contiguous,
    ``t [T_SPLITS, M, R]`` fp32 partials (see :func:`lowrank.down`), ``path`` ``gemv`` or ``gemm``."""
    m, k = x.shape
    n = scales.shape[1]
    key = _env.device_key(x.device)
    cfg = dict(cfg or configs.select(f"w4a16_{path}", key, m))
    group = _group(group_size, k)
    bk = configs.pow2_block_k(cfg["BLOCK_K"], group, 32 if path == "gemv" else 16)   # tl.dot: K ≥ 16
    bm = 1 if path == "gemv" else cfg["BLOCK_M"]
    n_tiles = triton.cdiv(m, bm) * triton.cdiv(n, cfg["BLOCK_N"])
    k_blocks = triton.cdiv(k, bk)
    split = cfg.get("SPLIT_K") or configs.split_k(n_tiles, k_blocks, _env.num_sms(x.device))
    k_split = triton.cdiv(k_blocks, split) * bk
    split = triton.cdiv(k, k_split)                           # drop empty splits
    y, finish = output(m, n, x.dtype, x.device, split)
    has_lr = t is not None
    if not has_lr:
        t, up = y, y                                           # unused pointers (HAS_LR=False)
    args = dict(x_ptr=x, qw_ptr=qweight, s_ptr=scales, z_ptr=qzeros, g_ptr=g_idx if g_idx is not None else qweight,
                b_ptr=bias if bias is not None else scales, t_ptr=t, up_ptr=up, y_ptr=y,
                N=n, K=k, K_SPLIT=k_split, R=up.shape[1] if has_lr else 0, T_SPLITS=t.shape[0] if has_lr else 1,
                stride_xm=x.stride(0), stride_qk=qweight.stride(0), stride_sg=scales.stride(0),
                stride_zg=qzeros.stride(0), stride_ts=t.stride(0), stride_tm=t.stride(1) if has_lr else 0,
                stride_un=up.stride(0), stride_ym=y.stride(0))
    consts = dict(_group_consts(group, bk, g_idx), HAS_BIAS=bias is not None, HAS_LR=has_lr,
                  ATOMIC=split > 1, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
                  BLOCK_R=max(16, min(configs.next_pow2(up.shape[1]) if has_lr else 16, 64)))
    if path == "gemv":
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, m)
        kernel = _w4a16_gemv_kernel
    else:
        args["M"] = m
        dot, prec = dot_dtype(x.dtype)
        consts.update(DOT=dot, PREC=prec, BLOCK_M=bm)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, cfg["BLOCK_N"]), split)
        kernel = _w4a16_gemm_kernel
    return Launch(kernel, grid, args, consts, **launch_opts(cfg), outputs=[y, finish])


def matmul(x, qweight, scales, qzeros, g_idx, group_size, bias=None, t=None, up=None, path="gemm", cfg=None):
    launch = matmul_launch(x, qweight, scales, qzeros, g_idx, group_size, bias, t, up, path, cfg)
    launch()
    y, finish = launch.outputs
    return finish(y)


def dequantize_launch(qweight, scales, qzeros, g_idx, group_size, k, dtype, cfg=None) -> Launch:
    n = scales.shape[1]
    cfg = dict(cfg or configs.select("w4_dequant", _env.device_key(qweight.device), 1))
    group = _group(group_size, k)
    bk = configs.pow2_block_k(cfg["BLOCK_K"], group, 32)
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    args = dict(qw_ptr=qweight, s_ptr=scales, z_ptr=qzeros, g_ptr=g_idx if g_idx is not None else qweight, w_ptr=w,
                N=n, K=k, stride_qk=qweight.stride(0), stride_sg=scales.stride(0), stride_zg=qzeros.stride(0),
                stride_wk=w.stride(0))
    consts = dict(_group_consts(group, bk, g_idx), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk)
    grid = (triton.cdiv(k, bk), triton.cdiv(n, cfg["BLOCK_N"]))
    return Launch(_w4_dequant_kernel, grid, args, consts, **launch_opts(cfg), outputs=[w])


def dequantize(qweight, scales, qzeros, g_idx, group_size, k, dtype, cfg=None) -> torch.Tensor:
    """Dense ``W [K, N]`` (input-major, i.e. ``Wᵀ``) in ``dtype``."""
    launch = dequantize_launch(qweight, scales, qzeros, g_idx, group_size, k, dtype, cfg)
    launch()
    return launch.outputs[0]
