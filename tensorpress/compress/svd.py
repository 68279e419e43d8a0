"""Truncated SVD baselines: plain SVD and SVD-LLM's activation-whitened SVD (arXiv 2403.07378,
training-free "SVD-LLM (W)"). Rank from ``rank`` or ``ratio`` (fraction of parameters *kept*)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TensorpressError
from ..nn import LowRankLinear
from .base import Compressor, LinearContext, check_number, register
from .lowrank import resolve_rank, truncated_svd, whitened_lowrank


@dataclass
class SVDParams:
    ratio: float | None = None       # fraction of the layer's parameters kept by the two factors
    rank: int | None = None
    sigma_side: str = "both"


class _SVDBase(Compressor):
    Params = SVDParams

    def validate(self):
        p = self.params
        if (p.ratio is None) == (p.rank is None):
            raise TensorpressError(f"method '{self.name}' needs exactly one of 'ratio' or 'rank'")
        if p.ratio is not None:
            check_number("ratio", p.ratio, 0, 1, lo_open=True)
        if p.rank is not None:
            check_number("rank", p.rank, 1, integer=True)
        if p.sigma_side not in ("both", "up", "down"):
            raise TensorpressError("sigma_side must be one of both, up, down")

    def rank_for(self, ctx: LinearContext) -> int:
        m = ctx.original
        return resolve_rank(m.out_features, m.in_features, self.params.rank, self.params.ratio, ctx.name)

    def check_layer(self, ctx: LinearContext):
        self.rank_for(ctx)

    def _module(self, ctx, down, up):
        m = LowRankLinear(ctx.original.in_features, ctx.original.out_features, ctx.bias is not None,
                          down.shape[0], ctx.dtype)
        m.down.data.copy_(down)
        m.up.data.copy_(up)
        if ctx.bias is not None:
            m.bias.data.copy_(ctx.bias)
        return m


@register
class SVD(_SVDBase):
    name = "svd"
    description = "plain truncated SVD of the weight (rank or parameter ratio kept)"

    def compress(self, ctx):
        return self._module(ctx, *truncated_svd(ctx.current_weight(), self.rank_for(ctx), self.params.sigma_side))


@register
class SVDLLM(_SVDBase):
    name = "svd-llm"
    description = "SVD-LLM (W): truncation-aware SVD whitened by the activation Gram"
    requires = frozenset({"gram"})

    def compress(self, ctx):
        down, up = whitened_lowrank(ctx.current_weight(), ctx.stats.gram(), self.rank_for(ctx),
                                    sigma_side=self.params.sigma_side)
        return self._module(ctx, down, up)
