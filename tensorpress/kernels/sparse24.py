"""2:4 sparse Triton kernels (decode) and the PyTorch semi-structured path (large M, CUDA).

Triton exposes no sparse tensor-core op, and at batch 1 the only win is bandwidth, so the decode
kernel is a gather-GEMV: it streams ``values [N, K/2]`` and the 2-bit ``meta`` (layout:
:func:`tensorpress.packing.pack_24`) and gathers ``x[4·(j//2) + idx]`` for every kept value ``j``.

ARMOR wrappers (``y = A·S·B·x``): the output wrapper ``A`` (block-diagonal, ``[N/b, b, b]``) is
applied in the GEMV epilogue when ``BLOCK_N == b``, each program then owning whole output blocks
(split-K partials are linear, so each split may apply ``A`` to its own partial); the input wrapper
``B`` is a small block-diagonal kernel run first. (Fusing ``B`` too would make every one of the
``N/BLOCK_N`` output tiles recompute ``B·x`` for its K range, reading all of ``B`` — ``K·b``
elements — once per tile: at K = 4096, b = 64 that is 0.5 MB per tile, more than the tile's share
of the sparse weight. The ``B·x`` kernel reads ``B`` once.)

Large M (``sparse_max_m`` < M, backend ``auto``, CUDA fp16/bf16): the 2:4 core goes through
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS), converted once per weight via
:func:`.ops.to_semi_structured`, which first checks that the weight really is 2:4.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _env, configs, reference
from .ops import to_semi_structured
from ._tl import Launch, dot_dtype, launch_opts, output
from ..packing import unpack_24


@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, meta_ptr, a_ptr, b_ptr, y_ptr, N, J, J_SPLIT,
                          stride_xm, stride_vn, stride_mn, stride_ym,
                          HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, A_CHUNK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn[:, None] < N
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    j_lo = pid_k * J_SPLIT
    for j0 in range(j_lo, tl.minimum(j_lo + J_SPLIT, J), BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        mask = nm & (jj[None, :] < J)
        v = tl.load(v_ptr + rn[:, None] * stride_vn + jj[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        mw = tl.load(meta_ptr + rn[:, None] * stride_mn + (jj // 16)[None, :], mask=mask, other=0)
        kk = 4 * (jj // 2)[None, :] + ((mw >> (2 * (jj % 16))[None, :]) & 3)
        xg = tl.load(x_ptr + m * stride_xm + kk, mask=mask, other=0.0)
        acc += v.to(tl.float32) * xg.to(tl.float32)
    out = tl.sum(acc, axis=1)
    if HAS_A:                                   # BLOCK_N == b: this program owns output block pid_n
        # y_blk = A_blk·out, in row chunks of A_blk (a whole b×b block would not fit in registers)
        cols = tl.arange(0, BLOCK_N)
        for i0 in tl.static_range(0, BLOCK_N, A_CHUNK):
            ri = i0 + tl.arange(0, A_CHUNK)
            a = tl.load(a_ptr + pid_n * BLOCK_N * BLOCK_N + ri[:, None] * BLOCK_N + cols[None, :]).to(tl.float32)
            _sparse_out(tl.sum(a * out[None, :], axis=1), pid_n * BLOCK_N + ri, b_ptr, y_ptr + m * stride_ym, N,
                        pid_k, HAS_BIAS, ATOMIC)
    else:
        _sparse_out(out, rn, b_ptr, y_ptr + m * stride_ym, N, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def _sparse_out(vals, rows, b_ptr, y_ptr, N, pid_k, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    if HAS_BIAS:
        if pid_k == 0:                          # split-K: the bias goes in once
            vals += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + rows, vals.to(y_ptr.dtype.element_ty), mask=rows < N)
    else:
        tl.store(y_ptr + rows, vals.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _blockdiag_kernel(x_ptr, blk_ptr, y_ptr, M, stride_xm, stride_ym,
                      DOT: tl.constexpr, PREC: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr):
    """``y[m, n·B + i] = Σ_j blk[n, i, j]·x[m, n·B + j]`` (fp32 out): ARMOR's input wrapper."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1)
    rb = tl.arange(0, B)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + n * B + rb[None, :], mask=rm[:, None] < M, other=0.0)
    w = tl.load(blk_ptr + n * B * B + rb[:, None] * B + rb[None, :])
    y = tl.dot(x.to(DOT), tl.trans(w.to(DOT)), input_precision=PREC)
    tl.store(y_ptr + rm[:, None] * stride_ym + n * B + rb[None, :], y, mask=rm[:, None] < M)


KERNELS = [_sparse24_gemv_kernel, _blockdiag_kernel]
A_TILE = 4096             # elements of A_blk held in registers at once by the fused output wrapper


def gemv_launch(x, values, meta, bias=None, armor_a=None, cfg=None, out_dtype=None) -> Launch:
    """``y = A·(S·x) + bias`` (A optional); ``x`` may be the fp32 output of the B wrapper."""
    m, k = x.shape
    n, j = values.shape
    cfg = dict(cfg or configs.select("sparse24_gemv", _env.device_key(x.device), m))
    if armor_a is not None:                     # the fused output wrapper needs BLOCK_N == b;
        tile = cfg["BLOCK_N"] * cfg["BLOCK_J"]  # keep the [BLOCK_N, BLOCK_J] tile the table's size
        cfg["BLOCK_N"] = armor_a.shape[1]
        cfg["BLOCK_J"] = max(16, tile // cfg["BLOCK_N"])
    n_tiles = m * triton.cdiv(n, cfg["BLOCK_N"])
    j_blocks = triton.cdiv(j, cfg["BLOCK_J"])
    split = cfg.get("SPLIT_K") or configs.split_k(n_tiles, j_blocks, _env.num_sms(x.device))
    j_split = triton.cdiv(j_blocks, split) * cfg["BLOCK_J"]
    split = triton.cdiv(j, j_split)
    y, finish = output(m, n, out_dtype or x.dtype, x.device, split)
    args = dict(x_ptr=x, v_ptr=values, meta_ptr=meta, a_ptr=armor_a if armor_a is not None else values,
                b_ptr=bias if bias is not None else values, y_ptr=y, N=n, J=j, J_SPLIT=j_split,
                stride_xm=x.stride(0), stride_vn=values.stride(0), stride_mn=meta.stride(0), stride_ym=y.stride(0))
    consts = dict(HAS_A=armor_a is not None, HAS_BIAS=bias is not None, ATOMIC=split > 1,
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_J=cfg["BLOCK_J"],
                  A_CHUNK=max(1, min(cfg["BLOCK_N"], A_TILE // cfg["BLOCK_N"])))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, m)
    return Launch(_sparse24_gemv_kernel, grid, args, consts, **launch_opts(cfg), outputs=[y, finish])


def blockdiag_launch(x, blocks, cfg=None) -> Launch:
    m, k = x.shape
    nb, b, _ = blocks.shape
    cfg = dict(cfg or configs.select("blockdiag", _env.device_key(x.device), m))
    y = torch.empty(m, k, dtype=torch.float32, device=x.device)
    dot, prec = dot_dtype(x.dtype if x.dtype == blocks.dtype else torch.float32)
    args = dict(x_ptr=x, blk_ptr=blocks, y_ptr=y, M=m, stride_xm=x.stride(0), stride_ym=y.stride(0))
    consts = dict(DOT=dot, PREC=prec, B=b, BLOCK_M=cfg["BLOCK_M"])
    return Launch(_blockdiag_kernel, (triton.cdiv(m, cfg["BLOCK_M"]), nb), args, consts, **launch_opts(cfg),
                  outputs=[y])


def _run(launch: Launch):
    launch()
    return launch.outputs


def linear(x, values, meta, bias=None, armor_a=None, armor_b=None, cfg=None) -> torch.Tensor:
    """Triton path of :func:`reference.sparse24_linear` for 2-D contiguous ``x``."""
    h = _run(blockdiag_launch(x, armor_b.contiguous()))[0] if armor_b is not None else x
    y, finish = _run(gemv_launch(h, values, meta, bias, armor_a, cfg, out_dtype=x.dtype))
    return finish(y)


# --- large M on CUDA: PyTorch semi-structured sparse (CUTLASS / cuSPARSELt) -----------------------

_SEMI: dict[int, tuple] = {}


def semi_structured_ok(x, values, in_features: int) -> bool:
    """Shapes and dtypes ``to_sparse_semi_structured`` accepts (fp16/bf16, rows % 32, cols % 64)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and values.shape[0] % 32 == 0
            and in_features % 64 == 0)


def _semi_weight(values, meta, in_features, dtype):
    """Semi-structured copy of the weight, built once per ``values`` tensor (and dropped with it)."""
    key = id(values)
    hit = _SEMI.get(key)
    if hit is not None and hit[0]() is values and hit[1] == (values._version, dtype):
        return hit[2]
    ws = to_semi_structured(unpack_24(values, meta, in_features).to(dtype))   # validated conversion
    _SEMI[key] = (weakref.ref(values, lambda _, k=key: _SEMI.pop(k, None)), (values._version, dtype), ws)
    return ws


def linear_semi_structured(x, values, meta, in_features, bias=None, armor_a=None, armor_b=None):
    h = reference.blockdiag(x.float(), armor_b.float()).to(x.dtype) if armor_b is not None else x
    y = F.linear(h, _semi_weight(values, meta, in_features, x.dtype))
    if armor_a is not None:
        y = reference.blockdiag(y.float(), armor_a.float()).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)
