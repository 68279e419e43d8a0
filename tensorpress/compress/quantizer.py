"""The one integer quantiser: group-wise grids, quantise / dequantise.

Conventions (see docs, "Reference integer quantizers"):

* codes are unsigned, ``q in [0, 2**bits - 1]``, ``w_hat = scale * (q - zero)``;
* symmetric: ``scale = max|w| / (2**(bits-1) - 1)``, ``zero = 2**(bits-1)`` (the GPTQ ``sym`` zero);
* asymmetric: ``xmin = min(0, min w)``, ``xmax = max(0, max w)``, ``scale = (xmax-xmin)/(2**bits-1)``,
  ``zero = round(-xmin/scale)``;
* scales are rounded (upwards) to fp16 *before* the codes are computed, so the stored grid is the grid the
  codes were chosen on; a zero scale becomes 1.
* optional clipping search (``clip_search``): the range is shrunk by the factor in a small grid that
  minimises the squared error of each row-group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128          # -1: one group per row
    sym: bool = True
    clip_search: bool = False      # search a shrink factor of the range per group (MSE)

    def validate(self, in_features: int | None = None) -> "QuantSpec":
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise TensorpressError(f"bits must be an integer in [2, 8], got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
                self.group_size != -1 and self.group_size < 1):
            raise TensorpressError(f"group_size must be -1 (per row) or a positive integer, got {self.group_size!r}")
        if self.group_size != -1 and self.group_size % 8 and self.group_size > 8:
            raise TensorpressError(f"group_size must be a multiple of 8 (or -1), got {self.group_size}")
        if in_features is not None and self.group_size > in_features:
            raise TensorpressError(
                f"group_size {self.group_size} cannot apply to a layer with {in_features} input features")
        return self

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        g = self.group(in_features)
        return (in_features + g - 1) // g


_CLIP_GRID = torch.linspace(1.0, 0.7, 16).tolist()


def _to_fp16_up(s: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16, upwards, so the stored grid still covers the range it was made for."""
    h = s.half()
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def _grid(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.sym:
        amax = torch.maximum(wmax.abs(), wmin.abs())
        scale = amax / (2 ** (spec.bits - 1) - 1)
        scale = _to_fp16_up(scale)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        xmin = torch.clamp(wmin, max=0)
        xmax = torch.clamp(wmax, min=0)
        scale = _to_fp16_up((xmax - xmin) / spec.maxq)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-xmin / scale), 0, spec.maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes for ``w`` on the grid ``(scale, zero)`` (broadcast along the last dim)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


def find_params(w: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid for each row of ``w`` ([rows, cols] -> scale [rows, 1], zero [rows, 1]).

    ``weight`` ([cols]) optionally weights the clipping-search error per column (e.g. diag(H)).
    """
    w = w.float()
    wmin, wmax = w.min(dim=1).values, w.max(dim=1).values
    scale, zero = _grid(wmin, wmax, spec)
    if spec.clip_search:
        best = torch.full_like(scale, float("inf"))
        cw = weight.float()[None, :] if weight is not None else 1.0
        bs, bz = scale.clone(), zero.clone()
        for f in _CLIP_GRID:
            s, z = _grid(wmin * f, wmax * f, spec)
            err = ((fake_quantize(w, s[:, None], z[:, None], spec.maxq) - w) ** 2 * cw).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            bs, bz = torch.where(better, s, bs), torch.where(better, z, bz)
        scale, zero = bs, bz
    return scale[:, None], zero[:, None]


def quantize_groups(w: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a whole matrix ``[out, in]`` group-wise along ``in``.

    Returns ``codes [out, in]`` (int32), ``scales [n_groups, out]`` and ``zeros [n_groups, out]``;
    a ragged last group (``in`` not a multiple of the group size) is quantised on its own.
    """
    out_f, in_f = w.shape
    g = spec.group(in_f)
    codes = torch.empty(out_f, in_f, dtype=torch.int32)
    scales, zeros = [], []
    for j in range(0, in_f, g):
        blk = w[:, j:j + g].float()
        s, z = find_params(blk, spec, None if weight is None else weight[j:j + g])
        codes[:, j:j + g] = quantize(blk, s, z, spec.maxq).to(torch.int32)
        scales.append(s[:, 0])
        zeros.append(z[:, 0])
    return codes, torch.stack(scales), torch.stack(zeros).to(torch.int32)
