"""Low-rank corrections of any compressed base: EoRA and its ablations (arXiv 2410.21271).

A correction stage comes after a base stage (RTN, GPTQ, pruning, …) and fits ``up @ down`` to the
residual ``ΔW = W − Ŵ`` of whatever came before it (``Ŵ`` includes earlier corrections, so
several correction stages stack):

* ``eora`` — minimises the calibration output error ``‖X(ΔW − BA)ᵀ‖_F``: truncated SVD of ``ΔW S``
  with ``S = Q Λ^½`` from the eigendecomposition of the input Gram (``space: eigen``). Eigenvalues
  below ``λ_max·n·eps_fp32`` are dropped from the pseudo-inverse, so a rank-deficient Gram never
  gives inf/NaN and ``A`` has no component in its null space. The Gram is the exact average over
  all calibration tokens (not the decayed running average of the reference codes; the result is
  invariant to its scale). ``space: activation`` is the paper's ACT-S ablation (``diag(mean|x|)``).
* ``svd-correction`` — plain truncated SVD of ``ΔW`` (the baseline EoRA is compared with).

The factors are stored in ``factor_dtype`` (fp16 by default, what PEFT adapters ship; ``model`` keeps
the model dtype) and counted at that size in bits per weight. The compensated module computes
``y = x Ŵᵀ + (x Aᵀ) Bᵀ + b`` and exports as base + PEFT LoRA adapter (``lora_alpha = r``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from ..nn import CompressedLinear
from .base import LinearContext, register
from .budget import BudgetParams, LowRankStage
from .lowrank import balance_factors, positive_scale, scaled_lowrank, truncated_svd, whitened_lowrank

FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "model": None}
SPACES = ("eigen", "activation", "identity")


@dataclass
class CorrectionParams(BudgetParams):
    space: str = "eigen"             # eigen (EoRA) | activation (ACT-S) | identity (plain SVD of ΔW)
    factor_dtype: str = "float16"    # float16 | bfloat16 | float32 | model


class _Correction(LowRankStage):
    role = "correction"
    Params = CorrectionParams

    def validate(self):
        super().validate()
        p = self.params
        if p.space not in SPACES:
            raise TensorpressError(f"space must be one of {', '.join(SPACES)}, got {p.space!r}")
        if not isinstance(p.factor_dtype, str) or p.factor_dtype not in FACTOR_DTYPES:   # dict lookup: str first
            raise TensorpressError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {p.factor_dtype!r}")
        if p.allocation == "sensitivity":
            raise TensorpressError(f"allocation 'sensitivity' is for factorisations (svd, svd-llm, asvd, fwsvd); "
                                   f"'{self.name}' budgets are allocated uniformly")
        # Instance attribute: which statistics are read depends on the parameters.
        self.requires = frozenset({"gram"} | ({"abs_mean"} if p.space == "activation" else set()))

    def _dtype(self, ctx: LinearContext) -> torch.dtype:
        return FACTOR_DTYPES[self.params.factor_dtype] or ctx.dtype

    def factor_bits(self, ctx: LinearContext) -> int:
        return torch.finfo(self._dtype(ctx)).bits

    def residual(self, ctx: LinearContext) -> torch.Tensor:
        cur = ctx.current
        if not isinstance(cur, CompressedLinear):
            raise TensorpressError(f"{ctx.name}: correction stage '{self.name}' needs a compressed base before it")
        return ctx.original.weight.detach().double() - cur.effective_weight().double()

    def fit(self, E: torch.Tensor, ctx: LinearContext, rank: int):
        space = self.params.space
        if space == "eigen":
            return whitened_lowrank(E, ctx.stats.gram(), rank, dtype=torch.float64)
        if space == "activation":
            return scaled_lowrank(E, rank, col_scale=positive_scale(ctx.stats.abs_mean(), 1e-6), dtype=torch.float64)
        return truncated_svd(E, rank, dtype=torch.float64)

    def compress(self, ctx: LinearContext):
        E = self.residual(ctx)
        # Balanced factors: the product is the same, and a badly scaled metric cannot push one factor
        # past the fp16 range (inf) and the other below it (0).
        down, up = balance_factors(*self.fit(E, ctx, self.rank_for(ctx)))
        if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
            raise TensorpressError(f"{ctx.name}: the {self.name} factors are not finite")
        cur = ctx.current
        if cur.rank:                      # stack on an earlier correction: one wider term
            down = torch.cat([cur.lr_down.double(), down], 0)
            up = torch.cat([cur.lr_up.double(), up], 1)
        cur.set_correction(down, up, dtype=self._dtype(ctx))
        return cur


@register
class EoRA(_Correction):
    name = "eora"
    description = "EoRA: low-rank correction of the base's error in the activation eigenspace (output-optimal)"
    requires = frozenset({"gram"})


@dataclass
class SVDCorrectionParams(CorrectionParams):
    space: str = "identity"


@register
class SVDCorrection(_Correction):
    name = "svd-correction"
    description = "plain truncated SVD of the base's weight error (the baseline for EoRA)"
    Params = SVDCorrectionParams
