"""Low-rank Triton kernels: ``t = x·downᵀ`` (the down-projection, fp32) and ``y = t·upᵀ + b``.

The down-projection must be complete before any up-projection, and recomputing it per output tile
would re-read ``down`` once per tile, so it is its own small kernel (as in Nunchaku). It splits K
for parallelism and writes one fp32 partial per split, ``t [SPLITS, M, R]``; consumers (the up
kernel here, the W4A16 epilogue) sum the partials while loading: no atomics, no zero-fill launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _env, configs
from ._tl import Launch, dot_dtype, launch_opts, lowrank_up


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


KERNELS = [_lr_down_kernel, _lr_up_kernel]


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


def lowrank_linear(x, down_w, up_w, bias=None, cfg_down=None, cfg_up=None) -> torch.Tensor:
    """``y = (x·downᵀ)·upᵀ + bias`` for 2-D contiguous ``x``."""
    launch = up_launch(down(x, down_w, cfg_down), up_w, bias, x.dtype, cfg_up)
    launch()
    return launch.outputs[0]
