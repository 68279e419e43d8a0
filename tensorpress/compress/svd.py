"""The truncated-SVD family: plain SVD, SVD-LLM (W), ASVD and FWSVD.

Each factorises the weight into ``up [out, r] @ down [r, in]`` (a :class:`LowRankLinear`), and
differs only in the metric the truncation is optimal for:

==========  =======================================  ===============================================
method      minimises                                 scales (``lowrank.py``)
==========  =======================================  ===============================================
svd         ‖W − Ŵ‖_F                                 none
svd-llm     ‖X(W − Ŵ)ᵀ‖_F (calibration output error)  ``S Sᵀ = XᵀX/N`` (arXiv 2403.07378, training-free)
asvd        ‖(W − Ŵ) diag(s)‖_F, ``s = m^α + 1e-6``    ``m`` = mean |x| (or max |x|) per input channel
                                                     (arXiv 2312.05821; exact SVD, not randomised)
fwsvd       Σ_j f_j ‖W_:j − Ŵ_:j‖²,  D = diag(√f)       ``f`` = Fisher of the LM loss summed per input
                                                     column (or per output row), arXiv 2207.00112
==========  =======================================  ===============================================

Rank: ``rank``, ``ratio`` (fraction of the layer's parameters **kept** by the two factors,
``r = ⌊ρ·out·in/(out+in)⌋``) or a ``budget`` over every layer the stage targets (see
:mod:`.budget`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from ..nn import LowRankLinear
from .base import Compressor, LinearContext, check_number, register
from .budget import BudgetParams, LowRankStage
from .lowrank import positive_scale, scaled_lowrank, truncated_svd, weighted_spectrum, whitened_lowrank, \
    whitened_spectrum


@dataclass
class SVDParams(BudgetParams):
    sigma_side: str = "both"         # where Σ goes: both factors (√Σ each), "up" or "down"


class _SVDBase(LowRankStage):
    Params = SVDParams

    def validate(self):
        super().validate()
        if self.params.sigma_side not in ("both", "up", "down"):
            raise TensorpressError("sigma_side must be one of both, up, down")

    def compress(self, ctx: LinearContext):
        down, up = self.factorise(ctx, self.rank_for(ctx))
        m = LowRankLinear(ctx.original.in_features, ctx.original.out_features, ctx.bias is not None,
                          down.shape[0], ctx.dtype)
        m.down.data.copy_(down)
        m.up.data.copy_(up)
        if ctx.bias is not None:
            m.bias.data.copy_(ctx.bias)
        return m

    def factorise(self, ctx: LinearContext, rank: int):
        raise NotImplementedError


@register
class SVD(_SVDBase):
    name = "svd"
    description = "plain truncated SVD of the weight (rank, parameter ratio kept, or a global budget)"

    def factorise(self, ctx, rank):
        return truncated_svd(ctx.current_weight(), rank, self.params.sigma_side, dtype=torch.float64)

    def spectrum(self, ctx):
        return weighted_spectrum(ctx.current_weight())


@register
class SVDLLM(_SVDBase):
    name = "svd-llm"
    description = "SVD-LLM (W): truncation-aware SVD whitened by the activation Gram"
    requires = frozenset({"gram"})

    def factorise(self, ctx, rank):
        return whitened_lowrank(ctx.current_weight(), ctx.stats.gram(), rank, sigma_side=self.params.sigma_side,
                                dtype=torch.float64)

    def spectrum(self, ctx):
        return whitened_spectrum(ctx.current_weight(), ctx.stats.gram())


@dataclass
class ASVDParams(SVDParams):
    alpha: float = 0.5               # exponent of the activation statistic (paper default)
    statistic: str = "abs_mean"      # "abs_mean" (default) or "abs_max" per input channel


@register
class ASVD(_SVDBase):
    name = "asvd"
    description = "ASVD: SVD of W·diag(m^α), m = mean (or max) |activation| per input channel"
    Params = ASVDParams
    requires = frozenset({"abs_mean", "abs_max"})      # both are one cheap reduction per batch

    def validate(self):
        super().validate()
        check_number("alpha", self.params.alpha, 0, 4)
        if self.params.statistic not in ("abs_mean", "abs_max"):
            raise TensorpressError("asvd statistic must be 'abs_mean' or 'abs_max'")

    def scales(self, ctx) -> torch.Tensor:
        m = ctx.stats.abs_mean() if self.params.statistic == "abs_mean" else ctx.stats.abs_max
        if m is None:
            raise TensorpressError(f"{ctx.name}: activation statistic {self.params.statistic} was not collected")
        # The paper's +1e-6 keeps s positive for dead channels; α = 0 gives s ≡ 1 (+1e-6): plain SVD.
        return m.double().clamp_min(0) ** self.params.alpha + 1e-6

    def factorise(self, ctx, rank):
        return scaled_lowrank(ctx.current_weight(), rank, col_scale=self.scales(ctx),
                              sigma_side=self.params.sigma_side, dtype=torch.float64)

    def spectrum(self, ctx):
        return weighted_spectrum(ctx.current_weight(), col_scale=self.scales(ctx))


@dataclass
class FWSVDParams(SVDParams):
    fisher_axis: str = "in"          # one weight per input column (default, as every LLM port) or "out"
    eps: float = 1e-6                # relative: D = √f + eps·mean(√f), so scaling F changes nothing


@register
class FWSVD(_SVDBase):
    name = "fwsvd"
    description = "FWSVD: SVD weighted by √(Fisher) per input column (or output row), Fisher from LM-loss gradients"
    requires = frozenset({"fisher"})
    Params = FWSVDParams

    def validate(self):
        super().validate()
        if self.params.fisher_axis not in ("in", "out"):
            raise TensorpressError("fisher_axis must be 'in' (per input column) or 'out' (per output row)")
        check_number("eps", self.params.eps, 0, 1, lo_open=True)

    def scales(self, ctx):
        st = ctx.stats
        f = st.fisher_in if self.params.fisher_axis == "in" else st.fisher_out
        if f is None:
            raise TensorpressError(f"{ctx.name}: the Fisher information was not collected")
        # FWSVD's convention: the weight is √(Σ F), not (Σ F)^{1/4} as ASVD's "fisher" mode gives.
        d = positive_scale(f.double().clamp_min(0).sqrt(), self.params.eps)
        return (d, None) if self.params.fisher_axis == "in" else (None, d)

    def factorise(self, ctx, rank):
        c, r = self.scales(ctx)
        return scaled_lowrank(ctx.current_weight(), rank, col_scale=c, row_scale=r, sigma_side=self.params.sigma_side,
                              dtype=torch.float64)

    def spectrum(self, ctx):
        c, r = self.scales(ctx)
        return weighted_spectrum(ctx.current_weight(), col_scale=c, row_scale=r)
