"""Shared Triton pieces: the launch record, dtype rules and the GPTQ 4-bit dequantisation helpers.

Imported only when a Triton path runs (never by ``import tensorpress.kernels``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from . import _env


@dataclass
class Launch:
    """One kernel launch, kept as data so that tests can compile it ahead of time (``aot.py``)
    with exactly the arguments the runtime would pass."""
    kernel: Any
    grid: tuple
    args: dict                       # runtime arguments (tensors, ints) by name
    consts: dict                     # tl.constexpr arguments by name
    num_warps: int = 4
    num_stages: int = 2
    outputs: list = field(default_factory=list)

    def __call__(self):
        self.kernel[self.grid](**self.args, **self.consts, num_warps=self.num_warps, num_stages=self.num_stages)


def launch_opts(cfg: dict) -> dict:
    return {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}


def dot_dtype(dtype: torch.dtype):
    """(tl dtype for tl.dot operands, input_precision). The interpreter's bf16 arithmetic is broken
    (raw uint16 maths), so bf16 dots run in fp32 there; fp32 dots use IEEE maths to match the
    reference (GPU default would be TF32)."""
    if dtype == torch.float16:
        return tl.float16, "ieee"
    if dtype == torch.bfloat16 and not _env.interpreting():
        return tl.bfloat16, "ieee"
    return tl.float32, "ieee"


def atomic_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether split-K partials can be atomically added straight into an output of ``dtype``
    (bf16 atomics need sm_90; the interpreter adds bf16 as raw integers)."""
    if dtype in (torch.float32, torch.float16):
        return True
    cap = _env.capability(device)
    return dtype == torch.bfloat16 and cap is not None and cap >= (9, 0)


def output(m: int, n: int, dtype: torch.dtype, device: torch.device, split: int):
    """Output buffer for a kernel with ``split`` K-partials: zeroed when partials are atomically
    added, fp32 when the output dtype has no usable atomics. Returns (buffer, finish)."""
    if split == 1:
        return torch.empty(m, n, dtype=dtype, device=device), lambda y: y
    if atomic_ok(dtype, device):
        return torch.zeros(m, n, dtype=dtype, device=device), lambda y: y
    return torch.zeros(m, n, dtype=torch.float32, device=device), lambda y: y.to(dtype)


@triton.jit
def load_group(s_ptr, z_ptr, g, rn, mask, stride_sg, stride_zg):
    """Scale and zero point of group(s) ``g`` (scalar or [R, 1]) for columns ``rn`` ([1, BN]).

    Returns fp32 ``s`` and ``zm = z + 2**23``: the zero point with the magic-number offset folded
    in, see :func:`dequant4`. ``qzeros`` packs 8 zero points per int32 along N (GPTQ)."""
    s = tl.load(s_ptr + g * stride_sg + rn, mask=mask, other=0.0).to(tl.float32)
    zw = tl.load(z_ptr + g * stride_zg + rn // 8, mask=mask, other=0)
    return s, ((zw >> ((rn % 8) * 4)) & 0xF).to(tl.float32) + 8388608.0


@triton.jit
def centered4(q, zm):
    """``q − z`` as fp32 for 4-bit codes ``q`` (int32, 0..15). OR-ing q into the mantissa of 2**23
    and bitcasting gives the float ``2**23 + q`` exactly (no int→float conversion, which runs at a
    fraction of the FMA rate); subtracting ``zm = 2**23 + z`` leaves the exact integer q − z."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - zm


@triton.jit
def dequant4(q, s, zm):
    """``s·(q − z)``, exact in fp32 (see :func:`centered4`)."""
    return centered4(q, zm) * s


@triton.jit
def load_t(t_ptr, rm, rr, M, R, T_SPLITS, stride_ts, stride_tm):
    """Low-rank activations ``t[rm, rr]`` [BM, BR] fp32, summed over the down kernel's K-splits."""
    mask = (rm[:, None] < M) & (rr[None, :] < R)
    ptrs = t_ptr + rm[:, None] * stride_tm + rr[None, :]
    t = tl.load(ptrs, mask=mask, other=0.0)
    for s in range(1, T_SPLITS):
        t += tl.load(ptrs + s * stride_ts, mask=mask, other=0.0)
    return t


@triton.jit
def lowrank_up(acc, t_ptr, up_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
               DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + t[rm]·up[rn]ᵀ`` with ``up [N, R]``: the up-projection epilogue (tl.dot, BLOCK_M ≥ 16)."""
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        t = load_t(t_ptr, rm, rr, M, R, T_SPLITS, stride_ts, stride_tm)
        u = tl.load(up_ptr + rn[:, None] * stride_un + rr[None, :],
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.dot(t.to(DOT), tl.trans(u.to(DOT)), input_precision=PREC)
    return acc


@triton.jit
def lowrank_up_vec(acc, t_ptr, up_ptr, m, rn, N, R, T_SPLITS, stride_ts, stride_tm, stride_un,
                   BLOCK_R: tl.constexpr):
    """Row-vector form of :func:`lowrank_up` for one row ``m`` (GEMV: no tl.dot)."""
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        t = tl.load(t_ptr + m * stride_tm + rr, mask=rr < R, other=0.0)
        for s in range(1, T_SPLITS):
            t += tl.load(t_ptr + s * stride_ts + m * stride_tm + rr, mask=rr < R, other=0.0)
        u = tl.load(up_ptr + rn[:, None] * stride_un + rr[None, :],
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.sum(u * t[None, :], axis=1)
    return acc
