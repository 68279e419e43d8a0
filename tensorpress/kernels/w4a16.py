"""W4A16 (+ fused low-rank) Triton kernels reading the GPTQ layout as stored (no repack).

``qweight int32 [ceil(K/8), N]``: input ``k`` sits in bits ``4·(k%8)`` of row ``k//8``, so every
load runs along N (coalesced). ``scales [G, N]``, ``qzeros int32 [G, ceil(N/8)]`` (actual zero
points), optional ``g_idx [K]``. ``y = x·dequant(W)ᵀ [+ (x·downᵀ)·upᵀ] [+ bias]``.

* GEMV (decode, M ≤ ``gemv_max_m``): split-K over a (N-tile, K-split, row) grid; a [BLOCK_K/8,
  BLOCK_N] tile of packed words is loaded once and its 8 nibbles are consumed one at a time
  (input rows ``k0 + 8i + j``), accumulating a 2-D fp32 tile that is reduced across K only once.
* GEMM (small/medium M): tl.dot on a dequantised [BLOCK_K, BLOCK_N] tile, split-K for few tiles.
* dequantise: writes ``W [K, N]`` in the activation dtype for cuBLAS (large M).

Low-rank term (``LR`` constexpr):

* ``LR == 2``, fused (one launch): the down-projection ``x·downᵀ`` is accumulated in fp32 from the
  same x registers the main product uses (each program covers its K-split: ``down [R, K]`` is read
  once per N-tile, from L2), and the up-projection ``t·up[n-tile]ᵀ`` is added in the epilogue.
  By linearity a K-split's share of ``t`` is a valid partial of the low-rank term, so split-K needs
  no grid-wide synchronisation.
* ``LR == 1``: ``t [T_SPLITS, M, R]`` fp32 partials precomputed by :func:`lowrank.down` (two
  launches; for ranks or batches where recomputing per N-tile costs more than the extra launch).

Split-K partials (``REDUCE``, :func:`._tl.reduce_mode`): serially reduced inside the kernel by
default (the last K-split of a tile sums the fp32 partials, adds the epilogue and stores: no
zero-filled output, no fp32 staging buffer), or atomically added into a zeroed output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _env, configs
from ._tl import (SERIAL, Launch, arrive, centered4, dequant4, dot_dtype, launch_opts, load_group, lowrank_up,
                  lowrank_up_vec, output, reduce_mode, release, sum_splits, up_dot, up_vec)


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, d_ptr, t_ptr, up_ptr, y_ptr, ws_ptr, lock_ptr,
                       N, K, K_SPLIT, R, T_SPLITS, N_SPLITS,
                       stride_xm, stride_qk, stride_sg, stride_zg, stride_dr, stride_ts, stride_tm, stride_un,
                       stride_ym, stride_ws,
                       GROUP: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_GIDX: tl.constexpr,
                       HAS_BIAS: tl.constexpr, LR: tl.constexpr, REDUCE: tl.constexpr,
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
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BKP, BLOCK_N), dtype=tl.float32)
    tacc = tl.zeros((BKP, BLOCK_R), dtype=tl.float32)     # LR == 2: this split's share of x·downᵀ
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
            if LR == 2:                                    # fused down-projection: same x registers
                a = tl.load(d_ptr + rr[None, :] * stride_dr + kj[:, None], mask=km[:, None] & (rr[None, :] < R),
                            other=0.0)
                tacc += xj * a.to(tl.float32)
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
    t = tl.sum(tacc, axis=0)
    nm = rn < N
    y = y_ptr + m * stride_ym + rn
    if REDUCE == 2:                                        # serial split-K: the last split finishes
        tile = m * tl.num_programs(0) + pid_n
        t_off = tl.num_programs(2) * N + tile * BLOCK_R + rr
        tl.store(ws_ptr + pid_k * stride_ws + m * N + rn, out, mask=nm)
        if LR == 2:
            tl.store(ws_ptr + pid_k * stride_ws + t_off, t)
        if arrive(lock_ptr + tile, N_SPLITS):
            out = sum_splits(ws_ptr, m * N + rn, nm, N_SPLITS, stride_ws)
            if LR == 2:
                out = up_vec(out, sum_splits(ws_ptr, t_off, rr < BLOCK_R, N_SPLITS, stride_ws), up_ptr, rn, rr, N,
                             R, stride_un)
            out = _gemv_tail(out, t_ptr, up_ptr, b_ptr, m, rn, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
                             LR, HAS_BIAS, BLOCK_R)
            tl.store(y, out.to(y_ptr.dtype.element_ty), mask=nm)
            release(lock_ptr + tile)
    else:
        if LR == 2:                                        # linear in x: every split adds its own share
            out = up_vec(out, t, up_ptr, rn, rr, N, R, stride_un)
        if pid_k == 0:
            out = _gemv_tail(out, t_ptr, up_ptr, b_ptr, m, rn, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
                             LR, HAS_BIAS, BLOCK_R)
        if REDUCE == 1:
            tl.atomic_add(y, out.to(y_ptr.dtype.element_ty), mask=nm)
        else:
            tl.store(y, out.to(y_ptr.dtype.element_ty), mask=nm)


@triton.jit
def _gemv_tail(out, t_ptr, up_ptr, b_ptr, m, rn, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
               LR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    """The once-per-output terms: the up-projection of a precomputed ``t`` (LR == 1) and the bias."""
    if LR == 1:
        out = lowrank_up_vec(out, t_ptr, up_ptr, m, rn, N, R, T_SPLITS, stride_ts, stride_tm, stride_un, BLOCK_R)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    return out


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, d_ptr, t_ptr, up_ptr, y_ptr, ws_ptr, lock_ptr,
                       M, N, K, K_SPLIT, R, T_SPLITS, N_SPLITS,
                       stride_xm, stride_qk, stride_sg, stride_zg, stride_dr, stride_ts, stride_tm, stride_un,
                       stride_ym, stride_ws,
                       GROUP: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_GIDX: tl.constexpr,
                       HAS_BIAS: tl.constexpr, LR: tl.constexpr, REDUCE: tl.constexpr,
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
    rr = tl.arange(0, BLOCK_R)
    shift = (rk % 8) * 4                                   # BLOCK_K and K_SPLIT are multiples of 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # LR == 2: this split's share of x·downᵀ
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        kk = k0 + rk
        km = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & km[None, :], other=0.0)
        if LR == 2:                                        # fused down-projection from the same x tile
            a = tl.load(d_ptr + rr[:, None] * stride_dr + kk[None, :], mask=(rr[:, None] < R) & km[None, :],
                        other=0.0)
            tacc += tl.dot(x.to(DOT), tl.trans(a.to(DOT)), input_precision=PREC)
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
    mm2 = rm[:, None] < M
    mask = mm2 & nm2
    y = y_ptr + rm[:, None] * stride_ym + rn2
    if REDUCE == 2:                                        # serial split-K: the last split finishes
        tile = pid_m * tl.num_programs(1) + pid_n
        offs = rm[:, None] * N + rn2
        t_off = M * N + (pid_n * M + rm[:, None]) * BLOCK_R + rr[None, :]
        tl.store(ws_ptr + pid_k * stride_ws + offs, acc, mask=mask)
        if LR == 2:
            tl.store(ws_ptr + pid_k * stride_ws + t_off, tacc, mask=mm2)
        if arrive(lock_ptr + tile, N_SPLITS):
            acc = sum_splits(ws_ptr, offs, mask, N_SPLITS, stride_ws)
            if LR == 2:
                acc = up_dot(acc, sum_splits(ws_ptr, t_off, mm2, N_SPLITS, stride_ws), up_ptr, rn, rr, N, R,
                             stride_un, DOT, PREC)
            acc = _gemm_tail(acc, t_ptr, up_ptr, b_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
                             LR, HAS_BIAS, DOT, PREC, BLOCK_R)
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
            release(lock_ptr + tile)
    else:
        if LR == 2:                                        # linear in x: every split adds its own share
            acc = up_dot(acc, tacc, up_ptr, rn, rr, N, R, stride_un, DOT, PREC)
        if pid_k == 0:
            acc = _gemm_tail(acc, t_ptr, up_ptr, b_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
                             LR, HAS_BIAS, DOT, PREC, BLOCK_R)
        if REDUCE == 1:
            tl.atomic_add(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_tail(acc, t_ptr, up_ptr, b_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
               LR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """The once-per-output terms: the up-projection of a precomputed ``t`` (LR == 1) and the bias."""
    if LR == 1:
        acc = lowrank_up(acc, t_ptr, up_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
                         DOT, PREC, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn[None, :], mask=rn[None, :] < N, other=0.0).to(tl.float32)
    return acc


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
                  path="gemm", cfg=None, down=None) -> Launch:
    """Launch record for ``y = x·dequant(W)ᵀ [+ (x·downᵀ)·upᵀ] [+ bias]``; ``x [M, K]`` contiguous,
    ``path`` ``gemv`` or ``gemm``. The low-rank term comes either from ``down [R, K]`` — fused: the
    kernel computes ``x·downᵀ`` from the x tiles it loads for the main product and adds the
    up-projection in its epilogue, one launch — or from ``t [T_SPLITS, M, R]``, fp32 partials of
    ``x·downᵀ`` precomputed by :func:`lowrank.down` (the two-kernel form)."""
    m, k = x.shape
    n = scales.shape[1]
    key = _env.device_key(x.device)
    cfg = dict(cfg or configs.select(f"w4a16_{path}", key, m))
    group = _group(group_size, k)
    bk = configs.pow2_block_k(cfg["BLOCK_K"], group, 32 if path == "gemv" else 16)   # tl.dot: K ≥ 16
    bm = 1 if path == "gemv" else cfg["BLOCK_M"]
    m_tiles, n_tiles = triton.cdiv(m, bm), triton.cdiv(n, cfg["BLOCK_N"])
    k_blocks = triton.cdiv(k, bk)
    split = cfg.get("SPLIT_K") or configs.split_k(m_tiles * n_tiles, k_blocks, _env.num_sms(x.device))
    k_split = triton.cdiv(k_blocks, split) * bk
    split = triton.cdiv(k, k_split)                           # drop empty splits
    lr = 2 if down is not None else 1 if t is not None else 0
    rank = up.shape[1] if lr else 0
    br = max(16, configs.next_pow2(rank)) if lr == 2 else max(16, min(configs.next_pow2(rank) if lr else 16, 32))
    reduce, locks = reduce_mode(cfg, split, m_tiles * n_tiles, x.device)
    y, finish = output(m, n, x.dtype, x.device, split, reduce)
    ws = (torch.empty(split, m * n + (m * n_tiles * br if lr == 2 else 0), dtype=torch.float32, device=x.device)
          if reduce == SERIAL else y)
    args = dict(x_ptr=x, qw_ptr=qweight, s_ptr=scales, z_ptr=qzeros, g_ptr=g_idx if g_idx is not None else qweight,
                b_ptr=bias if bias is not None else scales, d_ptr=down if lr == 2 else y,
                t_ptr=t if lr == 1 else y, up_ptr=up if lr else y, y_ptr=y, ws_ptr=ws,
                lock_ptr=locks if locks is not None else qweight,
                N=n, K=k, K_SPLIT=k_split, R=rank, T_SPLITS=t.shape[0] if lr == 1 else 1, N_SPLITS=split,
                stride_xm=x.stride(0), stride_qk=qweight.stride(0), stride_sg=scales.stride(0),
                stride_zg=qzeros.stride(0), stride_dr=down.stride(0) if lr == 2 else 0,
                stride_ts=t.stride(0) if lr == 1 else 0, stride_tm=t.stride(1) if lr == 1 else 0,
                stride_un=up.stride(0) if lr else 0, stride_ym=y.stride(0), stride_ws=ws.stride(0))
    consts = dict(_group_consts(group, bk, g_idx), HAS_BIAS=bias is not None, LR=lr, REDUCE=reduce,
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, BLOCK_R=br)
    if path == "gemv":
        grid = (n_tiles, split, m)
        kernel = _w4a16_gemv_kernel
    else:
        args["M"] = m
        dot, prec = dot_dtype(x.dtype)
        consts.update(DOT=dot, PREC=prec, BLOCK_M=bm)
        grid = (m_tiles, n_tiles, split)
        kernel = _w4a16_gemm_kernel
    return Launch(kernel, grid, args, consts, **launch_opts(cfg), outputs=[y, finish])


def matmul(x, qweight, scales, qzeros, g_idx, group_size, bias=None, t=None, up=None, path="gemm", cfg=None,
           down=None):
    launch = matmul_launch(x, qweight, scales, qzeros, g_idx, group_size, bias, t, up, path, cfg, down)
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
