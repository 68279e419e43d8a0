"""W4A8 + low-rank: SVDQuant's structure on GPUs without 4-bit tensor cores (Hopper), for prefill.

Two launches, as in Nunchaku (``quantize_w4a4_act_fuse_lora`` then the GEMM):

* Kernel 1 (``_act_quant_kernel``) is the only reader of ``x``. Per row-block it scales by
  ``1/smooth``, quantises to int8 per token (or per group of inputs) with the rounding of
  :func:`reference.quantize_activations`, and from the same raw x registers accumulates the
  low-rank down-projection ``t = x·downᵀ`` in fp32. When an activation group fits one tile
  (``act_group_size`` ≤ BLOCK_K, or a per-token row ≤ BLOCK_K) it is a single pass: each element
  of x is loaded exactly once. Per-token scales at large K need the row's max before its first
  code, so the kernel makes two passes over its own BLOCK_M rows (max + down-projection, then the
  codes); the second re-reads rows it has just loaded (from L2), still inside kernel 1.
* Kernel 2 (``_w4a8_gemm_kernel``): int4 weights unpacked to int8 (``q − z`` ∈ [−15, 15] is exact),
  ``tl.dot(int8, int8) → int32`` per K tile, rescaled by ``sx[m]·sw[n]`` (BLOCK_K divides both the
  weight and activation groups), then ``+ t·upᵀ + bias`` in the epilogue. It reads the int8 codes
  (half the bytes of a bf16 x), never x.

Why not one launch: every output tile of the GEMM needs its rows' codes over the whole of K, and a
code depends on its token's max over the whole row (per-token scales), so the scales must be
complete before the GEMM's first K step. Fusing would make each of the ``N/BLOCK_N`` output tiles
first re-read and re-reduce the full bf16 rows of x for the max, then read them again to quantise —
2·N/BLOCK_N reads of x at twice the bytes of the codes — or need a grid-wide barrier, which a
Triton launch does not have. (The low-rank term alone would not force a second launch: the W4A16
kernels of :mod:`.w4a16` recompute their share of ``x·downᵀ`` per output tile and fuse it.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _env, configs
from ._tl import Launch, dot_dtype, launch_opts, lowrank_up


@triton.jit
def _act_quant_kernel(x_ptr, inv_ptr, d_ptr, q_ptr, sx_ptr, t_ptr, M, K, R, AG,
                      stride_xm, stride_dr, stride_qm, stride_sm, stride_tm,
                      HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, ONE_PASS: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm[:, None] < M
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for g0 in range(0, K, AG):                       # activation groups (AG = K: per token)
        g_hi = tl.minimum(g0 + AG, K)                # BLOCK_K divides AG, or AG = K
        if ONE_PASS:                                 # the group is one tile (AG <= BLOCK_K): x read once,
            kk = g0 + rk                             # quantised from the registers it was loaded into
            mask = mm & (kk[None, :] < g_hi)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_LR:
                d = tl.load(d_ptr + rr[:, None] * stride_dr + kk[None, :],
                            mask=(rr[:, None] < R) & (kk[None, :] < g_hi), other=0.0)
                t += tl.dot(x.to(DOT), tl.trans(d.to(DOT)), input_precision=PREC)
            if HAS_SMOOTH:
                x = x * tl.load(inv_ptr + kk, mask=kk < g_hi, other=0.0)[None, :]
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
            inv = 127.0 / amax
            tl.store(sx_ptr + rm * stride_sm + g0 // AG, amax / 127.0, mask=rm < M)
            q = tl.minimum(tl.maximum(tl.floor(x * inv[:, None] + 0.5), -127.0), 127.0)
            tl.store(q_ptr + rm[:, None] * stride_qm + kk[None, :], q.to(tl.int8), mask=mask)
        else:                                        # a group spans several tiles (per-token scales at
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)    # large K): its max is needed before any code
            for k0 in range(g0, g_hi, BLOCK_K):      # pass 1: group max (+ low-rank on raw x)
                kk = k0 + rk
                mask = mm & (kk[None, :] < K)
                x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_LR:
                    d = tl.load(d_ptr + rr[:, None] * stride_dr + kk[None, :],
                                mask=(rr[:, None] < R) & (kk[None, :] < K), other=0.0)
                    t += tl.dot(x.to(DOT), tl.trans(d.to(DOT)), input_precision=PREC)
                if HAS_SMOOTH:
                    x = x * tl.load(inv_ptr + kk, mask=kk < K, other=0.0)[None, :]
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            amax = tl.maximum(amax, 1e-12)
            inv = 127.0 / amax
            tl.store(sx_ptr + rm * stride_sm + g0 // AG, amax / 127.0, mask=rm < M)
            for k0 in range(g0, g_hi, BLOCK_K):      # pass 2: quantise; re-reads this program's own
                kk = k0 + rk                         # BLOCK_M rows, just loaded (L2), never the GEMM's job
                mask = mm & (kk[None, :] < K)
                x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_SMOOTH:
                    x = x * tl.load(inv_ptr + kk, mask=kk < K, other=0.0)[None, :]
                q = tl.minimum(tl.maximum(tl.floor(x * inv[:, None] + 0.5), -127.0), 127.0)
                tl.store(q_ptr + rm[:, None] * stride_qm + kk[None, :], q.to(tl.int8), mask=mask)
    if HAS_LR:
        tl.store(t_ptr + rm[:, None] * stride_tm + rr[None, :], t, mask=mm & (rr[None, :] < R))


@triton.jit
def _w4a8_gemm_kernel(q_ptr, sx_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, t_ptr, up_ptr, y_ptr, M, N, K, R,
                      stride_qm, stride_sm, stride_qk, stride_sg, stride_zg, stride_tm, stride_un, stride_ym,
                      GROUP: tl.constexpr, AG: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.max_contiguous(tl.multiple_of(rn, BLOCK_N), BLOCK_N)
    mm = rm < M
    nm = rn < N
    rk = tl.arange(0, BLOCK_K)
    shift = ((rk % 8) * 4)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        km = kk < K
        a = tl.load(q_ptr + rm[:, None] * stride_qm + kk[None, :], mask=mm[:, None] & km[None, :], other=0)
        pw = tl.load(qw_ptr + (kk // 8)[:, None] * stride_qk + rn[None, :], mask=km[:, None] & nm[None, :], other=0)
        g = k0 // GROUP
        zw = tl.load(z_ptr + g * stride_zg + rn // 8, mask=nm, other=0)
        z = (zw >> ((rn % 8) * 4)) & 0xF
        w = (((pw >> shift) & 0xF) - z[None, :]).to(tl.int8)
        part = tl.dot(a, w)                           # int32, exact
        sw = tl.load(s_ptr + g * stride_sg + rn, mask=nm, other=0.0).to(tl.float32)
        sx = tl.load(sx_ptr + rm * stride_sm + k0 // AG, mask=mm, other=0.0)
        acc += part.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_LR:
        acc = lowrank_up(acc, t_ptr, up_ptr, rm, rn, M, N, R, 1, 0, stride_tm, stride_un, DOT, PREC, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn[None, :], mask=nm[None, :], other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


KERNELS = [_act_quant_kernel, _w4a8_gemm_kernel]
MAX_FUSED_RANK = 128        # kernel 1 keeps t [BLOCK_M, rank] in registers


def block_k(group: int, act_group: int, k: int, block: int) -> int | None:
    """Largest power-of-two BLOCK_K ≤ ``block`` dividing the weight group and the activation group
    (a group equal to K never constrains it); ≥ 32 because int8 dots need K ≥ 32 on Triton 3.6.
    None when there is none (→ reference)."""
    while block >= 32:
        if all(g % block == 0 for g in (group, act_group) if g != k):
            return block
        block //= 2
    return None


def act_quant_launch(x, smooth_inv, down, act_group_size, cfg=None) -> Launch:
    m, k = x.shape
    cfg = dict(cfg or configs.select("act_quant", _env.device_key(x.device), m))
    ag = k if act_group_size == -1 else act_group_size
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    sx = torch.empty(m, triton.cdiv(k, ag), dtype=torch.float32, device=x.device)
    has_lr = down is not None
    r = down.shape[0] if has_lr else 0
    t = torch.empty(1, m, r, dtype=torch.float32, device=x.device) if has_lr else sx
    dot, prec = dot_dtype(x.dtype)
    args = dict(x_ptr=x, inv_ptr=smooth_inv if smooth_inv is not None else x, d_ptr=down if has_lr else x,
                q_ptr=q, sx_ptr=sx, t_ptr=t, M=m, K=k, R=r, AG=ag, stride_xm=x.stride(0),
                stride_dr=down.stride(0) if has_lr else 0, stride_qm=q.stride(0), stride_sm=sx.stride(0),
                stride_tm=t.stride(-2))
    bk = configs.pow2_block_k(cfg["BLOCK_K"], ag, 16) if ag != k else cfg["BLOCK_K"]
    if ag == k and configs.next_pow2(k) <= bk:     # per token, but the whole row fits one tile
        bk = max(16, configs.next_pow2(k))
    consts = dict(HAS_SMOOTH=smooth_inv is not None, HAS_LR=has_lr, ONE_PASS=ag <= bk, DOT=dot, PREC=prec,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_K=bk, BLOCK_R=max(16, configs.next_pow2(r)))
    return Launch(_act_quant_kernel, (triton.cdiv(m, cfg["BLOCK_M"]),), args, consts, **launch_opts(cfg),
                  outputs=[q, sx, t if has_lr else None])


def gemm_launch(q, sx, qweight, scales, qzeros, group_size, act_group_size, dtype, bias=None, t=None, up=None,
                cfg=None) -> Launch:
    m, k = q.shape
    n = scales.shape[1]
    cfg = dict(cfg or configs.select("w4a8_gemm", _env.device_key(q.device), m))
    group = k if group_size == -1 else group_size
    ag = k if act_group_size == -1 else act_group_size
    bk = block_k(group, ag, k, cfg["BLOCK_K"])
    y = torch.empty(m, n, dtype=dtype, device=q.device)
    has_lr = t is not None
    dot, prec = dot_dtype(dtype)
    args = dict(q_ptr=q, sx_ptr=sx, qw_ptr=qweight, s_ptr=scales, z_ptr=qzeros, y_ptr=y, M=m, N=n, K=k,
                b_ptr=bias if bias is not None else scales,
                t_ptr=t if has_lr else sx, up_ptr=up if has_lr else scales, R=up.shape[1] if has_lr else 0,
                stride_qm=q.stride(0), stride_sm=sx.stride(0), stride_qk=qweight.stride(0),
                stride_sg=scales.stride(0), stride_zg=qzeros.stride(0), stride_tm=t.stride(-2) if has_lr else 0,
                stride_un=up.stride(0) if has_lr else 0, stride_ym=y.stride(0))
    consts = dict(GROUP=group, AG=ag, HAS_BIAS=bias is not None, HAS_LR=has_lr, DOT=dot, PREC=prec,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
                  BLOCK_R=max(16, min(64, configs.next_pow2(up.shape[1]))) if has_lr else 16)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    return Launch(_w4a8_gemm_kernel, grid, args, consts, **launch_opts(cfg), outputs=[y])


def supported(group_size: int, act_group_size: int, k: int, g_idx, rank: int) -> bool:
    group = k if group_size == -1 else group_size
    ag = k if act_group_size == -1 else act_group_size
    return g_idx is None and rank <= MAX_FUSED_RANK and block_k(group, ag, k, 128) is not None


def quantize(x, smooth_inv=None, down=None, act_group_size=-1, cfg=None):
    """``(q int8 [M, K], sx fp32 [M, G], t fp32 [1, M, R] | None)`` for 2-D contiguous ``x``."""
    launch = act_quant_launch(x, smooth_inv, down, act_group_size, cfg)
    launch()
    return launch.outputs


def linear(x, qweight, scales, qzeros, group_size, bias=None, lr_down=None, lr_up=None, smooth=None,
           act_group_size=-1, cfg_quant=None, cfg_gemm=None):
    """Triton path of :func:`reference.w4a8_linear` (check :func:`supported` first)."""
    smooth_inv = None if smooth is None else (1.0 / smooth.float()).contiguous()
    q, sx, t = quantize(x, smooth_inv, lr_down, act_group_size, cfg_quant)
    launch = gemm_launch(q, sx, qweight, scales, qzeros, group_size, act_group_size, x.dtype, bias, t, lr_up, cfg_gemm)
    launch()
    return launch.outputs[0]
