"""LOST-style decomposition: truncated SVD plus a few dense input channels of the residual.

LOST (arXiv 2508.02668) is a *pre-training* method; this one-shot form is a tensorpress adaptation
that the paper does not evaluate (docs/algorithms/sparse.md §5.3):

1. ``L = up @ down``, the rank-``r`` truncated SVD of ``W`` (√Σ on each factor);
2. ``W_comp = W − L`` (all remaining components);
3. importance of input channel ``j``: ``‖W_comp[:, j]‖₂`` (``score: l2``, the paper's ``SVD^rem_l2``) or,
   a toolkit extension, ``‖W_comp[:, j]‖₂·‖X_j‖₂`` (``score: act_l2``, the diagonal output-error proxy);
4. ``I`` = the ``k`` most important channels, sorted ascending (ties: lower index first); ``k = 0`` is
   allowed and gives exactly the truncated SVD;
5. ``W_s = W_comp[:, I]`` (``sparse_init: residual``, default): then ``Ŵ[:, I] = W[:, I]`` exactly and
   ``‖W − Ŵ‖_F² = Σ_{j∉I} ‖W_comp[:, j]‖²``, which the ``l2`` choice of ``I`` minimises given ``L``.
   ``sparse_init: original`` (``W[:, I]``, the author's development code) double-counts ``L`` on those
   columns and is there for comparison only.

No nonlinearity and no mixing factor γ: one-shot, both would stop the layer from reproducing ``W``.
Forward: ``y = up(down x) + W_s x[I] + b`` (a :class:`~tensorpress.nn.modules.LowRankSparseLinear`).

**Budget.** ``rho`` is the fraction of input channels kept by the sparse part (default 0.05, the
development code's default), ``k = ⌊rho·in⌋``. With ``ratio`` (fraction of the layer's parameters
**kept**, as in ``svd``) the sparse part takes its ``k·(out + 1)`` parameters (columns plus one index
each) first and the rank gets the rest: ``r = ⌊(ratio·out·in − k·(out+1)) / (out+in)⌋`` (at least 1,
else an error). So at ``rho: 0`` the layer is exactly ``svd`` at the same ``ratio``. With ``rank`` the
rank is fixed and the channels come on top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from ..nn.modules import LowRankSparseLinear
from .base import Compressor, LinearContext, check_number, register
from .lowrank import truncated_svd


def lost_split(out_f: int, in_f: int, ratio: float, rho: float) -> tuple[int, int]:
    """``(rank, channels)`` holding at most ``ratio·out·in`` parameters (indices counted)."""
    k = int(math.floor(rho * in_f + 1e-9))
    r = int(math.floor((ratio * out_f * in_f - k * (out_f + 1)) / (out_f + in_f)))
    return r, k


def lost_decompose(W: torch.Tensor, rank: int, n_channels: int, *, score: str = "l2",
                   input_norm: torch.Tensor | None = None, sparse_init: str = "residual"):
    """``(down [r, in], up [out, r], channels int64 [k] sorted, sparse [out, k])``, all fp64 but the index."""
    W = W.double()
    down, up = truncated_svd(W, rank, dtype=torch.float64)
    comp = W - up @ down
    imp = comp.norm(dim=0)
    if score == "act_l2":
        imp = imp * input_norm.double()
    # Stable descending sort: among equal importances the lower channel index wins.
    chosen = torch.sort(-imp, stable=True).indices[:n_channels].sort().values
    sparse = (comp if sparse_init == "residual" else W)[:, chosen]
    return down, up, chosen, sparse


@dataclass
class LostParams:
    ratio: float | None = None       # fraction of the layer's parameters kept (rank + channels), as in svd
    rank: int | None = None          # or a fixed rank, channels on top
    rho: float = 0.05                # fraction of input channels kept by the sparse part
    score: str = "l2"                # channel importance: l2 (paper) | act_l2 (× ‖X_j‖, toolkit extension)
    sparse_init: str = "residual"    # residual (W_comp[:, I], Frobenius-optimal) | original (W[:, I])


@register
class Lost(Compressor):
    name = "lost"
    description = "LOST-style one-shot: truncated SVD + the k input channels of the residual with the largest norm"
    Params = LostParams

    def validate(self):
        p = self.params
        if (p.ratio is None) == (p.rank is None):
            raise TensorpressError("method 'lost' needs exactly one of 'ratio' (fraction of parameters kept) or 'rank'")
        if p.ratio is not None:
            check_number("ratio", p.ratio, 0, 1, lo_open=True)
        if p.rank is not None:
            check_number("rank", p.rank, 1, integer=True)
        check_number("rho", p.rho, 0, 1)
        if p.score not in ("l2", "act_l2"):
            raise TensorpressError(f"lost score must be 'l2' or 'act_l2', got {p.score!r}")
        if p.sparse_init not in ("residual", "original"):
            raise TensorpressError(f"lost sparse_init must be 'residual' or 'original', got {p.sparse_init!r}")
        # Instance-level: only the activation-weighted score reads statistics.
        self.requires = frozenset({"input_norm"}) if p.score == "act_l2" else frozenset()

    def shape_for(self, ctx: LinearContext) -> tuple[int, int]:
        p, m = self.params, ctx.original
        out_f, in_f = m.out_features, m.in_features
        if p.rank is not None:
            r, k = p.rank, int(math.floor(p.rho * in_f + 1e-9))
        else:
            r, k = lost_split(out_f, in_f, p.ratio, p.rho)
            if r < 1:
                raise TensorpressError(f"{ctx.name}: lost ratio {p.ratio} cannot hold rank 1 once rho {p.rho} "
                                       f"keeps {k} channels; raise ratio or lower rho")
        if r > min(out_f, in_f):
            raise TensorpressError(f"rank {r} is above min(out, in) = {min(out_f, in_f)} for {ctx.name}")
        return r, k

    def check_layer(self, ctx: LinearContext):
        self.shape_for(ctx)

    def compress(self, ctx: LinearContext):
        r, k = self.shape_for(ctx)
        norm = ctx.stats.input_norm() if self.params.score == "act_l2" else None
        down, up, chosen, sparse = lost_decompose(ctx.current_weight(), r, k, score=self.params.score,
                                                  input_norm=norm, sparse_init=self.params.sparse_init)
        m = LowRankSparseLinear(ctx.original.in_features, ctx.original.out_features, ctx.bias is not None, r, k,
                                ctx.dtype)
        m.down.data.copy_(down)
        m.up.data.copy_(up)
        m.channels.copy_(chosen.to(torch.int32))
        m.sparse.data.copy_(sparse)
        if ctx.bias is not None:
            m.bias.data.copy_(ctx.bias)
        return m
