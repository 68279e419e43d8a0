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


# Split-K reduction modes (the ``REDUCE`` constexpr of the split kernels).
STORE, ATOMIC, SERIAL = 0, 1, 2


def output(m: int, n: int, dtype: torch.dtype, device: torch.device, split: int, reduce: int = ATOMIC):
    """Output buffer for a kernel with ``split`` K-partials: zeroed when partials are atomically
    added, fp32 when the output dtype has no usable atomics. Returns (buffer, finish). A single
    split, or the serial reduction (the last split writes the sum), needs neither: no extra launch."""
    if split == 1 or reduce == SERIAL:
        return torch.empty(m, n, dtype=dtype, device=device), lambda y: y
    if atomic_ok(dtype, device):
        return torch.zeros(m, n, dtype=dtype, device=device), lambda y: y
    return torch.zeros(m, n, dtype=torch.float32, device=device), lambda y: y.to(dtype)


_LOCKS: dict = {}
_RETIRED: list = []
LOCKS_MIN = 1 << 14


def reduce_mode(cfg: dict, split: int, tiles: int, device: torch.device) -> tuple[int, Any]:
    """(REDUCE, lock buffer) for a launch with ``split`` partials over ``tiles`` output tiles.

    ``SERIAL`` (the default, config ``REDUCE: "serial"``): each split writes its fp32 partial to a
    workspace and counts itself on the tile's arrival counter; the last to arrive sums the partials
    in split order (deterministic), applies the epilogue, stores the output and resets the counter.
    One launch, no zero-filled output, fp32 accumulation for every dtype. ``ATOMIC`` (config
    ``REDUCE: "atomic"``): partials atomically added into a zeroed output (one extra fill launch).

    The counters are persistent, zero-initialised int32 buffers that every kernel leaves zeroed:
    one per (device, stream) for eager launches, so that kernels running concurrently on different
    streams never share a counter, and one per device for launches captured into CUDA graphs (the
    replay stream is unknown at capture time; graphs replayed concurrently on several streams of
    one device should set ``REDUCE: "atomic"``). Buffers are allocated (once, both kinds) outside
    capture; a capture that would need a new or larger one falls back to ``ATOMIC``."""
    if split == 1:
        return STORE, None
    if cfg.get("REDUCE", "serial") == "atomic":
        return ATOMIC, None
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    dev = str(device)
    key = (dev, "graph") if capturing else (dev, torch.cuda.current_stream(device).cuda_stream
                                             if device.type == "cuda" else 0)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < tiles:
        if capturing:
            return ATOMIC, None
        size = max(tiles, LOCKS_MIN)
        buf = _LOCKS[key] = torch.zeros(size, dtype=torch.int32, device=device)
        graph = _LOCKS.get((dev, "graph"))
        if device.type == "cuda" and (graph is None or graph.numel() < size):
            if graph is not None:
                _RETIRED.append(graph)           # graphs captured earlier still point at it: never free
            _LOCKS[(dev, "graph")] = torch.zeros(size, dtype=torch.int32, device=device)
    return SERIAL, buf


@triton.jit
def arrive(lock_ptr, n_splits):
    """Count this program's partial on its tile's counter (after all of its threads' partial
    stores: barrier, then an acq_rel atomic). True for the last of ``n_splits`` arrivals."""
    tl.debug_barrier()
    prev = tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu")
    return prev == n_splits - 1


@triton.jit
def sum_splits(ws_ptr, offs, mask, n_splits, stride_ws):
    """``Σ_s ws[s, offs]`` in split order (L2 loads: the partials were written by other SMs)."""
    total = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, n_splits):
        total += tl.load(ws_ptr + s * stride_ws + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def release(lock_ptr):
    """Reset a tile's arrival counter for the next launch (by the last arrival only)."""
    tl.atomic_xchg(lock_ptr, 0)


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


@triton.jit
def up_vec(acc, t, up_ptr, rn, rr, N, R, stride_un):
    """``acc + up[rn]·t`` for a row vector ``t [BLOCK_R]`` held in registers (fused GEMV epilogue)."""
    u = tl.load(up_ptr + rn[:, None] * stride_un + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R),
                other=0.0).to(tl.float32)
    return acc + tl.sum(u * t[None, :], axis=1)


@triton.jit
def up_dot(acc, t, up_ptr, rn, rr, N, R, stride_un, DOT: tl.constexpr, PREC: tl.constexpr):
    """``acc + t·up[rn]ᵀ`` for ``t [BLOCK_M, BLOCK_R]`` held in registers (fused GEMM epilogue)."""
    u = tl.load(up_ptr + rn[:, None] * stride_un + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R),
                other=0.0)
    return acc + tl.dot(t.to(DOT), tl.trans(u.to(DOT)), input_precision=PREC)
