"""Pure-PyTorch reference of every kernel op: the specification, the CPU path and the oracle.

All ops take ``x [..., K]`` and return ``[..., N]`` in ``x.dtype``.

Weight layout (GPTQ, canonical on disk): ``qweight int32 [ceil(K*bits/32), N]`` packed along the
input dim K; ``scales [G, N]``; ``qzeros int32 [G, ceil(N*bits/32)]`` packed along N holding the
*actual* zero point (GPTQ "v2" semantics); ``g_idx int32 [K]`` or ``None`` (then ``k // group_size``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import unpack_24, unpack_bits


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None, device=None) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.long()
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // g


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                      g_idx: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``W [N, K]`` from the packed GPTQ-layout tensors."""
    n = scales.shape[1]
    q = unpack_bits(qweight, bits, in_features, dim=0)              # [K, N]
    z = unpack_bits(qzeros, bits, n, dim=1)                         # [G, N]
    gi = group_index(in_features, group_size, g_idx, qweight.device)
    s = scales.float()
    w = s[gi] * (q.float() - z[gi].float())                         # [K, N]
    return w.t().to(dtype)


def quant_linear(x: torch.Tensor, qweight, scales, qzeros, g_idx, bits: int, group_size: int,
                 in_features: int, bias=None, lr_down=None, lr_up=None) -> torch.Tensor:
    """``y = x·dequant(W)ᵀ + (x·lr_downᵀ)·lr_upᵀ + bias``."""
    w = dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype=x.dtype)
    y = F.linear(x, w, bias)
    if lr_down is not None:
        y = y + F.linear(F.linear(x, lr_down.to(x.dtype)), lr_up.to(x.dtype))
    return y


def lowrank_linear(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias=None) -> torch.Tensor:
    """``y = (x·downᵀ)·upᵀ + bias`` with ``down [r, K]``, ``up [N, r]``."""
    return F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype), None if bias is None else bias.to(x.dtype))


# --- W4A8: activation-quantised path (SVDQuant on GPUs without 4-bit tensor cores) ------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def quantize_activations(x: torch.Tensor, smooth: torch.Tensor | None = None,
                         group_size: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x ⊘ smooth`` per token (``group_size`` −1) or per group of
    ``group_size`` consecutive inputs. ``x [M, K]`` → ``(q int8 [M, K], scale fp32 [M, G])`` with
    ``x ⊘ smooth ≈ q·scale``. Rounding, mirrored exactly by the Triton kernel (all fp32)::

        v = x · (1 / smooth)                  # reciprocal taken once, per input channel
        a = max(max|v| over the group, 1e-12)
        q = clamp(floor(v · (127 / a) + 0.5), −127, 127)    # round half up
        scale = a / 127
    """
    m, k = x.shape
    v = x.float()
    if smooth is not None:
        v = v * (1.0 / smooth.float())
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    vg = F.pad(v, (0, n_groups * g - k)).view(m, n_groups, g)
    amax = vg.abs().amax(-1).clamp_min(1e-12)
    q = torch.floor(vg * (127.0 / amax)[..., None] + 0.5).clamp(-127, 127)
    return q.view(m, -1)[:, :k].to(torch.int8), amax / 127.0


def w4a8_linear(x: torch.Tensor, qweight, scales, qzeros, g_idx, group_size: int, in_features: int,
                bias=None, lr_down=None, lr_up=None, smooth=None, act_group_size: int = -1) -> torch.Tensor:
    """``y = deq(quantize_activations(x, smooth, act_group_size))·dequant(W)ᵀ + (x·lr_downᵀ)·lr_upᵀ + bias``
    for 4-bit GPTQ-layout weights that were multiplied by ``diag(smooth)`` (SVDQuant). The low-rank
    branch reads the raw ``x``: ``lr_down`` is stored unsmoothed."""
    lead, k = x.shape[:-1], in_features
    x2 = x.reshape(-1, k)
    ct = _compute_dtype(x.dtype)
    q, sx = quantize_activations(x2, smooth, act_group_size)
    g = k if act_group_size == -1 else act_group_size
    xa = q.to(ct) * sx.to(ct).repeat_interleave(g, dim=1)[:, :k]
    y = xa @ dequantize_weight(qweight, scales, qzeros, g_idx, 4, group_size, k, ct).t()
    if lr_down is not None:
        y = y + (x2.to(ct) @ lr_down.to(ct).t()) @ lr_up.to(ct).t()
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype).reshape(*lead, -1)


# --- 2:4 sparse (+ ARMOR block-diagonal wrappers) ----------------------------------------------------

def blockdiag(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x·blockdiag(blocks)ᵀ``: ``y[..., n·b + i] = Σ_j blocks[n, i, j]·x[..., n·b + j]``, blocks ``[n, b, b]``
    stored ``[out, in]`` (ARMOR's ``einsum('...ni,nji->...nj')``)."""
    n, b, _ = blocks.shape
    return torch.einsum("...nj,nij->...ni", x.unflatten(-1, (n, b)), blocks).flatten(-2)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                    bias=None, armor_a=None, armor_b=None) -> torch.Tensor:
    """``y = A·(S·(B·x)) + bias``: ``S [N, K]`` the 2:4 weight in the kernel layout of
    :func:`tensorpress.packing.pack_24` (``values [N, K/2]``, 2-bit ``meta``); optional ARMOR wrappers
    ``A = blockdiag(armor_a [N/b, b, b])`` and ``B = blockdiag(armor_b [K/b, b, b])``. Maths in fp32."""
    ct = _compute_dtype(x.dtype)
    h = x.to(ct)
    if armor_b is not None:
        h = blockdiag(h, armor_b.to(ct))
    y = h @ unpack_24(values, meta, in_features).to(ct).t()
    if armor_a is not None:
        y = blockdiag(y, armor_a.to(ct))
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
