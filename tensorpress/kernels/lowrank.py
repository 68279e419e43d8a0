"""Low-rank Triton kernels for ``y = (x·downᵀ)·upᵀ + b`` (``down [R, K]``, ``up [N, R]``).

* Fused, one launch (small M): each program owns an output tile and a slice of the rank. It
  computes its slice of ``t = x·downᵀ`` over the whole K (fp32, from the x tiles it loads) and
  multiplies it straight into its output tile, ``t`` never leaves registers. Rank slices are
  independent terms of the sum, so a rank split (more programs for a high rank on few output tiles)
  is reduced like split-K (:func:`._tl.reduce_mode`: serial, in the same launch). The price is that
  ``down`` is read once per output tile (from L2: it is ``R·K`` elements, e.g. 256 KB at r = 32,
  K = 4096); wide BLOCK_N keeps that small.
* Two kernels (larger M under the ``triton`` backend, and the W4A16 path for high ranks): the
  down-projection ``t = x·downᵀ`` as its own kernel, which splits K for parallelism and writes one
  fp32 partial per split, ``t [SPLITS, M, R]``; consumers (the up kernel here, the W4A16 epilogue)
  sum the partials while loading: no atomics, no zero-fill launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _env, configs
from ._tl import SERIAL, Launch, arrive, dot_dtype, launch_opts, lowrank_up, output, reduce_mode, release, sum_splits


@triton.jit
def _lr_down_kernel(x_ptr, d_ptr, t_ptr, M, R, K, K_SPLIT, stride_xm, stride_dr, stride_ts, stride_tm,
                    DOT: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        kk = k0 + rk
        km = kk[None, :] < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & km, other=0.0)
        d = tl.load(d_ptr + rr[:, None] * stride_dr + kk[None, :], mask=(rr[:, None] < R) & km, other=0.0)
        acc += tl.dot(x.to(DOT), tl.trans(d.to(DOT)), input_precision=PREC)
    tl.store(t_ptr + pid_k * stride_ts + rm[:, None] * stride_tm + rr[None, :], acc,
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _lr_up_kernel(t_ptr, up_ptr, b_ptr, y_ptr, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un, stride_ym,
                  HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = lowrank_up(acc, t_ptr, up_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un, DOT, PREC, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn[None, :], mask=rn[None, :] < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _lr_fused_kernel(x_ptr, d_ptr, up_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, R, R_SPLIT, N_SPLITS,
                     stride_xm, stride_dr, stride_un, stride_ym, stride_ws,
                     HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm2 = rm[:, None] < M
    nm2 = rn[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    r_lo = pid_s * R_SPLIT
    for r0 in range(r_lo, tl.minimum(r_lo + R_SPLIT, R), BLOCK_R):   # usually one BLOCK_R chunk
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < R
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            km = kk[None, :] < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mm2 & km, other=0.0)
            d = tl.load(d_ptr + rr[:, None] * stride_dr + kk[None, :], mask=rmask[:, None] & km, other=0.0)
            t += tl.dot(x.to(DOT), tl.trans(d.to(DOT)), input_precision=PREC)
        u = tl.load(up_ptr + rn[:, None] * stride_un + rr[None, :], mask=(rn[:, None] < N) & rmask[None, :],
                    other=0.0)
        acc += tl.dot(t.to(DOT), tl.trans(u.to(DOT)), input_precision=PREC)
    mask = mm2 & nm2
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if REDUCE == 2:                                   # rank split, serial: the last slice finishes
        tile = pid_m * tl.num_programs(1) + pid_n
        offs = rm[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_s * stride_ws + offs, acc, mask=mask)
        if arrive(lock_ptr + tile, N_SPLITS):
            acc = sum_splits(ws_ptr, offs, mask, N_SPLITS, stride_ws)
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn[None, :], mask=nm2, other=0.0).to(tl.float32)
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
            release(lock_ptr + tile)
    else:
        if HAS_BIAS:
            if pid_s == 0:
                acc += tl.load(b_ptr + rn[None, :], mask=nm2, other=0.0).to(tl.float32)
        if REDUCE == 1:
            tl.atomic_add(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


KERNELS = [_lr_down_kernel, _lr_up_kernel, _lr_fused_kernel]


def down_launch(x, down, cfg=None) -> Launch:
    """``t [SPLITS, M, R]`` fp32 partials of ``x·downᵀ`` (``x [M, K]``, ``down [R, K]``, both contiguous)."""
    m, k = x.shape
    r = down.shape[0]
    cfg = dict(cfg or configs.select("lr_down", _env.device_key(x.device), m))
    br = max(16, min(cfg["BLOCK_R"], configs.next_pow2(r)))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(r, br)
    k_blocks = triton.cdiv(k, cfg["BLOCK_K"])
    # Half a wave: the whole kernel reads only r·K weights, more programs just add partials to sum.
    split = cfg.get("SPLIT_K") or configs.split_k(tiles, k_blocks, _env.num_sms(x.device), waves=0.5)
    k_split = triton.cdiv(k_blocks, split) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_split)
    t = torch.empty(split, m, r, dtype=torch.float32, device=x.device)
    dot, prec = dot_dtype(x.dtype)
    args = dict(x_ptr=x, d_ptr=down, t_ptr=t, M=m, R=r, K=k, K_SPLIT=k_split, stride_xm=x.stride(0),
                stride_dr=down.stride(0), stride_ts=t.stride(0), stride_tm=t.stride(1))
    consts = dict(DOT=dot, PREC=prec, BLOCK_M=cfg["BLOCK_M"], BLOCK_R=br, BLOCK_K=cfg["BLOCK_K"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(r, br), split)
    return Launch(_lr_down_kernel, grid, args, consts, **launch_opts(cfg), outputs=[t])


def down(x, down_w, cfg=None) -> torch.Tensor:
    launch = down_launch(x, down_w, cfg)
    launch()
    return launch.outputs[0]


def up_launch(t, up_w, bias, dtype, cfg=None) -> Launch:
    """``y = (Σ_s t[s])·upᵀ + bias`` in ``dtype``; ``up [N, R]`` contiguous."""
    _, m, r = t.shape
    n = up_w.shape[0]
    cfg = dict(cfg or configs.select("lr_up", _env.device_key(t.device), m))
    br = max(16, min(cfg["BLOCK_R"], configs.next_pow2(r)))
    y = torch.empty(m, n, dtype=dtype, device=t.device)
    dot, prec = dot_dtype(dtype)
    args = dict(t_ptr=t, up_ptr=up_w, b_ptr=bias if bias is not None else up_w, y_ptr=y, M=m, N=n, R=r,
                T_SPLITS=t.shape[0], stride_ts=t.stride(0), stride_tm=t.stride(1), stride_un=up_w.stride(0),
                stride_ym=y.stride(0))
    consts = dict(HAS_BIAS=bias is not None, DOT=dot, PREC=prec, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_R=br)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    return Launch(_lr_up_kernel, grid, args, consts, **launch_opts(cfg), outputs=[y])


def fused_launch(x, down_w, up_w, bias=None, cfg=None) -> Launch:
    """One-launch ``y = (x·downᵀ)·upᵀ + bias`` (``x [M, K]``, ``down [R, K]``, ``up [N, R]``, contiguous)."""
    m, k = x.shape
    r, n = down_w.shape[0], up_w.shape[0]
    cfg = dict(cfg or configs.select("lr_fused", _env.device_key(x.device), m))
    br = max(16, min(cfg["BLOCK_R"], configs.next_pow2(r)))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    r_blocks = triton.cdiv(r, br)
    # Split the rank only to fill the GPU (one wave): each split re-reads x and its slice of down.
    split = cfg.get("SPLIT_R") or configs.split_k(tiles, r_blocks, _env.num_sms(x.device), waves=1, min_blocks=1)
    r_split = triton.cdiv(r_blocks, split) * br
    split = triton.cdiv(r, r_split)
    reduce, locks = reduce_mode(cfg, split, tiles, x.device)
    y, finish = output(m, n, x.dtype, x.device, split, reduce)
    ws = torch.empty(split, m * n, dtype=torch.float32, device=x.device) if reduce == SERIAL else y
    dot, prec = dot_dtype(x.dtype)
    args = dict(x_ptr=x, d_ptr=down_w, up_ptr=up_w, b_ptr=bias if bias is not None else up_w, y_ptr=y, ws_ptr=ws,
                lock_ptr=locks if locks is not None else down_w, M=m, N=n, K=k, R=r, R_SPLIT=r_split,
                N_SPLITS=split, stride_xm=x.stride(0), stride_dr=down_w.stride(0), stride_un=up_w.stride(0),
                stride_ym=y.stride(0), stride_ws=ws.stride(0))
    consts = dict(HAS_BIAS=bias is not None, REDUCE=reduce, DOT=dot, PREC=prec, BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=br)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    return Launch(_lr_fused_kernel, grid, args, consts, **launch_opts(cfg), outputs=[y, finish])


def fused(x, down_w, up_w, bias=None, cfg=None) -> torch.Tensor:
    launch = fused_launch(x, down_w, up_w, bias, cfg)
    launch()
    y, finish = launch.outputs
    return finish(y)


def lowrank_linear(x, down_w, up_w, bias=None, cfg_down=None, cfg_up=None) -> torch.Tensor:
    """``y = (x·downᵀ)·upᵀ + bias`` for 2-D contiguous ``x`` in two kernels (down, then up)."""
    launch = up_launch(down(x, down_w, cfg_down), up_w, bias, x.dtype, cfg_up)
    launch()
    return launch.outputs[0]
