"""Public kernel entry points. Each op picks a backend by device, shape and batch size.

Every op is a ``torch.library.custom_op`` in the ``tensorpress`` namespace (opaque to
``torch.compile``, with a fake implementation). Inside, the choice is made per call:

* ``TENSORPRESS_BACKEND=reference``, CPU tensors, no Triton or a pre-sm_80 GPU → the pure-PyTorch
  reference (:mod:`.reference`, also the test oracle);
* otherwise (CUDA + Triton, or the ``interpret`` test backend), by the rows ``M`` of ``x`` and the
  thresholds of :mod:`.configs`:

  ==================  ==========================================  =====================================
  op                  Triton kernels                              large M (backend ``auto`` only)
  ==================  ==========================================  =====================================
  quant_linear (4b)   M ≤ gemv_max_m: split-K GEMV; else tl.dot    M > fused_max_m (fp32 x: M > gemv_max_m):
                      GEMM. Low-rank term (rank ≤                  Triton dequantise + cuBLAS, ``addmm``
                      lr_fused_max_rank, M ≤ lr_fused_max_m)       for the low-rank term
                      fused: x·downᵀ from the
                      x tiles the kernel loads, up-projection in
                      the epilogue — one launch (split-K reduced
                      in-kernel). Higher ranks: down kernel +
                      epilogue.
  w4a8_linear         act-quant (+smooth, +down; the only reader   same Triton kernels
                      of x) → int8 GEMM (+up, +bias epilogue): two
                      launches, since per-token scales need the
                      whole row's max before the GEMM (see w4a8)
  lowrank_linear      M ≤ lowrank_fused_max_m and rank ≤           M > lowrank_max_m: two cuBLAS GEMMs
                      lowrank_fused_max_rank: one fused launch;
                      else down kernel + up kernel
  sparse24_linear     ARMOR B kernel → 2:4 gather-GEMV (+A fused)  M > sparse_max_m: PyTorch
                                                                   semi-structured (cuSPARSELt/CUTLASS)
  ==================  ==========================================  =====================================

Other bit widths, shapes a kernel does not cover, and calls that need autograd (inputs requiring
grad) run the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _env, configs, reference


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _rows(x: Tensor, k: int) -> Tensor:
    return x.reshape(-1, k).contiguous()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _limits(x: Tensor) -> dict:
    return configs.thresholds(_env.device_key(x.device))


# --- W4A16 (+ low-rank) ----------------------------------------------------------------------------

@torch.library.custom_op("tensorpress::quant_linear", mutates_args=())
def _quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Optional[Tensor], bits: int,
                  group_size: int, in_features: int, bias: Optional[Tensor], lr_down: Optional[Tensor],
                  lr_up: Optional[Tensor]) -> Tensor:
    if bits != 4 or not _env.use_triton(x) or x.numel() == 0:
        return reference.quant_linear(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features,
                                      bias, lr_down, lr_up)
    w4 = _env.kernel_module("w4a16")
    x2, qweight, scales, qzeros = _rows(x, in_features), _c(qweight), _c(scales), _c(qzeros)
    m, lim = x2.shape[0], _limits(x)
    # Prefill is compute-bound: cuBLAS wins, dequantising costs about one weight write. fp32
    # activations go there too past the GEMV (an IEEE fp32 tl.dot has no tensor cores and spills).
    big = m > lim["fused_max_m"] or (x.dtype == torch.float32 and m > lim["gemv_max_m"])
    if big and _env.fast_paths_allowed():
        w = w4.dequantize(qweight, scales, qzeros, g_idx, group_size, in_features, x.dtype)
        y = x2 @ w if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
        if lr_down is not None:
            y.addmm_(x2 @ lr_down.to(x.dtype).t(), lr_up.to(x.dtype).t())
    else:
        path = "gemv" if m <= lim["gemv_max_m"] else "gemm"
        down = t = None
        if lr_down is not None and lr_down.shape[0] <= lim["lr_fused_max_rank"] and m <= lim["lr_fused_max_m"]:
            down = lr_down.contiguous()               # one launch: x·downᵀ fused into the main kernel
        elif lr_down is not None:                     # high rank: down-projection kernel + epilogue
            t = _env.kernel_module("lowrank").down(x2, lr_down.contiguous())
        y = w4.matmul(x2, qweight, scales, qzeros, g_idx, group_size, _c(bias), t, _c(lr_up), path, down=down)
    return y.reshape(*x.shape[:-1], -1)


@_quant_linear.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features, bias, lr_down, lr_up):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


def quant_linear(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features,
                 bias=None, lr_down=None, lr_up=None):
    """``y = x·dequant(W)ᵀ + (x·lr_downᵀ)·lr_upᵀ + bias`` (GPTQ layout, see :mod:`.reference`)."""
    if _needs_grad(x, bias, lr_down, lr_up, scales):
        return reference.quant_linear(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features,
                                      bias, lr_down, lr_up)
    return _quant_linear(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features, bias, lr_down, lr_up)


@torch.library.custom_op("tensorpress::dequantize_weight", mutates_args=())
def _dequantize_weight(qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Optional[Tensor], bits: int,
                       group_size: int, in_features: int, dtype: torch.dtype) -> Tensor:
    if bits == 4 and _env.use_triton(qweight):
        w = _env.kernel_module("w4a16").dequantize(qweight, scales, qzeros, g_idx, group_size, in_features, dtype)
        return w.t().contiguous()
    w = reference.dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype)
    return w.contiguous()


@_dequantize_weight.register_fake
def _(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype):
    return scales.new_empty(scales.shape[1], in_features, dtype=dtype)


def dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype=torch.float32):
    """Dense ``W [N, K]`` (contiguous) from the GPTQ-layout tensors."""
    if _needs_grad(scales):
        return reference.dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype)
    return _dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype)


# --- W4A8 (+ smoothing, + low-rank) ----------------------------------------------------------------

@torch.library.custom_op("tensorpress::w4a8_linear", mutates_args=())
def _w4a8_linear(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Optional[Tensor],
                 group_size: int, in_features: int, bias: Optional[Tensor], lr_down: Optional[Tensor],
                 lr_up: Optional[Tensor], smooth: Optional[Tensor], act_group_size: int) -> Tensor:
    rank = 0 if lr_down is None else lr_down.shape[0]
    if (not _env.use_triton(x) or x.numel() == 0
            or not _env.kernel_module("w4a8").supported(group_size, act_group_size, in_features, g_idx, rank)):
        return reference.w4a8_linear(x, qweight, scales, qzeros, g_idx, group_size, in_features, bias,
                                     lr_down, lr_up, smooth, act_group_size)
    y = _env.kernel_module("w4a8").linear(_rows(x, in_features), _c(qweight), _c(scales), _c(qzeros), group_size,
                                          _c(bias), _c(lr_down), _c(lr_up), smooth, act_group_size)
    return y.reshape(*x.shape[:-1], -1)


@_w4a8_linear.register_fake
def _(x, qweight, scales, qzeros, g_idx, group_size, in_features, bias, lr_down, lr_up, smooth, act_group_size):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


def w4a8_linear(x, qweight, scales, qzeros, g_idx, group_size, in_features, bias=None, lr_down=None,
                lr_up=None, smooth=None, act_group_size=-1):
    """SVDQuant-style ``y = deq(int8(x ⊘ smooth))·dequant(W)ᵀ + (x·lr_downᵀ)·lr_upᵀ + bias`` with 4-bit
    GPTQ-layout ``W``, int8 activations per token (``act_group_size`` −1) or per group of inputs
    (rounding: :func:`.reference.quantize_activations`). Not differentiable (rounding)."""
    return _w4a8_linear(x, qweight, scales, qzeros, g_idx, group_size, in_features, bias, lr_down, lr_up,
                        smooth, act_group_size)


# --- plain low-rank ---------------------------------------------------------------------------------

@torch.library.custom_op("tensorpress::lowrank_linear", mutates_args=())
def _lowrank_linear(x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor]) -> Tensor:
    m = x.numel() // down.shape[1]
    if (not _env.use_triton(x) or m == 0
            or (m > _limits(x)["lowrank_max_m"] and _env.fast_paths_allowed())):   # cuBLAS × 2
        return reference.lowrank_linear(x, down, up, bias)
    lr = _env.kernel_module("lowrank")
    x2, down, up, bias = _rows(x, down.shape[1]), _c(down), _c(up), _c(bias)
    lim = _limits(x)
    if m <= lim["lowrank_fused_max_m"] and down.shape[0] <= lim["lowrank_fused_max_rank"]:
        y = lr.fused(x2, down, up, bias)                  # one launch: t = x·downᵀ stays in registers
    else:
        y = lr.lowrank_linear(x2, down, up, bias)         # down kernel + up kernel
    return y.reshape(*x.shape[:-1], -1)


@_lowrank_linear.register_fake
def _(x, down, up, bias):
    return x.new_empty(*x.shape[:-1], up.shape[0])


def lowrank_linear(x, down, up, bias=None):
    """``y = (x·downᵀ)·upᵀ + bias`` with ``down [r, K]``, ``up [N, r]``."""
    if _needs_grad(x, down, up, bias):
        return reference.lowrank_linear(x, down, up, bias)
    return _lowrank_linear(x, down, up, bias)


# --- 2:4 sparse (+ ARMOR) ---------------------------------------------------------------------------

def to_semi_structured(w: Tensor):
    """PyTorch semi-structured (cuSPARSELt / CUTLASS) copy of a dense 2:4 weight ``w [N, K]``,
    validated first: ``torch.sparse.to_sparse_semi_structured`` keeps two values per group of four
    and silently drops any others, so a weight that is not really 2:4 raises ``ValueError`` here
    (naming the first offending row and group) instead of computing with a different matrix."""
    from ..packing import check_24
    check_24(w)
    return torch.sparse.to_sparse_semi_structured(w)


def _armor_ok(*blocks) -> bool:
    """Triton wrappers need power-of-two blocks ≥ 16 (tl.arange, tl.dot)."""
    return all(b is None or (b.shape[1] >= 16 and b.shape[1] & (b.shape[1] - 1) == 0) for b in blocks)


@torch.library.custom_op("tensorpress::sparse24_linear", mutates_args=())
def _sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, in_features: int, bias: Optional[Tensor],
                     armor_a: Optional[Tensor], armor_b: Optional[Tensor]) -> Tensor:
    for name, blocks, dim in (("armor_a", armor_a, values.shape[0]), ("armor_b", armor_b, in_features)):
        if blocks is not None and (blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]
                                   or blocks.shape[0] * blocks.shape[1] != dim):
            raise ValueError(f"{name} {tuple(blocks.shape)} is not [{dim}/b, b, b]")
    if not _env.use_triton(x) or x.numel() == 0 or not _armor_ok(armor_a, armor_b):
        return reference.sparse24_linear(x, values, meta, in_features, bias, armor_a, armor_b)
    sp = _env.kernel_module("sparse24")
    x2 = _rows(x, in_features)
    m = x2.shape[0]
    if m > _limits(x)["sparse_max_m"] and _env.fast_paths_allowed():
        if sp.semi_structured_ok(x2, values, in_features):
            y = sp.linear_semi_structured(x2, values, meta, in_features, bias, armor_a, armor_b)
        else:
            y = reference.sparse24_linear(x2, values, meta, in_features, bias, armor_a, armor_b)
    else:
        y = sp.linear(x2, _c(values), _c(meta), _c(bias), _c(armor_a), armor_b)
    return y.reshape(*x.shape[:-1], -1)


@_sparse24_linear.register_fake
def _(x, values, meta, in_features, bias, armor_a, armor_b):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def sparse24_linear(x, values, meta, in_features, bias=None, armor_a=None, armor_b=None):
    """``y = A·(S·(B·x)) + bias``: 2:4 weight ``S`` as ``values [N, K/2]`` + 2-bit ``meta``
    (:func:`tensorpress.packing.pack_24`), optional ARMOR block-diagonal wrappers ``armor_a [N/b, b, b]``
    and ``armor_b [K/b, b, b]`` (blocks stored ``[out, in]``). Maths in fp32."""
    if _needs_grad(x, values, bias, armor_a, armor_b):
        return reference.sparse24_linear(x, values, meta, in_features, bias, armor_a, armor_b)
    return _sparse24_linear(x, values, meta, in_features, bias, armor_a, armor_b)
