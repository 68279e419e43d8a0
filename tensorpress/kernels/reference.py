"""Pure-PyTorch reference of every kernel op: the specification, the CPU path and the oracle.

Weight layout (GPTQ, canonical on disk): ``qweight int32 [ceil(K*bits/32), N]`` packed along the
input dim K; ``scales [G, N]``; ``qzeros int32 [G, ceil(N*bits/32)]`` packed along N holding the
*actual* zero point (GPTQ "v2" semantics); ``g_idx int32 [K]`` or ``None`` (then ``k // group_size``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import unpack_bits


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
