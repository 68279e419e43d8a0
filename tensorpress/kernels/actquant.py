"""Fake quantisation of activations at any bit width (the CPU path of W4A4, and the search objective).

``fake_quantize_activations(x, bits, group_size, smooth)`` returns ``deq(q(x ⊘ smooth))`` in fp32 with
symmetric codes per token (``group_size`` −1) or per group of ``group_size`` consecutive inputs::

    v     = x · (1 / smooth)                       # reciprocal once per input channel
    a     = max(max|v| over the group, 1e-12)
    qmax  = 2**(bits-1) − 1
    q     = clamp(floor(v · (qmax / a) + 0.5), −qmax, qmax)      # round half up
    x̂     = q · (a / qmax)

At ``bits = 8`` this is exactly :func:`tensorpress.kernels.reference.quantize_activations` (the rounding
the W4A8 Triton kernel mirrors), dequantised. It lives in its own file for now; it should later be
merged with ``reference.quantize_activations`` (one activation quantiser with a ``bits`` argument).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fake_quantize_activations(x: torch.Tensor, bits: int, group_size: int = -1,
                              smooth: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` → fp32 ``[..., K]``: ``x ⊘ smooth`` rounded to ``bits``-bit symmetric codes
    (scale per token or per group of inputs) and dequantised. ``bits >= 16`` only smooths."""
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"activation bits must be an integer >= 2, got {bits!r}")
    k = x.shape[-1]
    v = x.reshape(-1, k).float()
    if smooth is not None:
        v = v * (1.0 / smooth.float())
    if bits >= 16:
        return v.reshape(x.shape)
    m = v.shape[0]
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    vg = F.pad(v, (0, n_groups * g - k)).view(m, n_groups, g)
    qmax = float(2 ** (bits - 1) - 1)
    amax = vg.abs().amax(-1).clamp_min(1e-12)
    q = torch.floor(vg * (qmax / amax)[..., None] + 0.5).clamp(-qmax, qmax)
    out = (q * (amax / qmax)[..., None]).view(m, -1)[:, :k]
    return out.reshape(x.shape)


__all__ = ["fake_quantize_activations"]
