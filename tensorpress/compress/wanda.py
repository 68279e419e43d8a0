"""Wanda (Sun et al., arXiv 2306.11695) and per-row magnitude pruning: one-shot masks, no weight update.

Wanda scores ``S_ij = |W_ij|·‖X_j‖₂`` and compares scores **per output row** (unstructured: each row
loses exactly ``⌊s·in⌋``) or per group of ``m`` consecutive inputs of a row (N:M). Kept weights are
bit-identical to the input; pruned ones become 0 (docs: algorithms/sparse.md §1).

``magnitude`` is the same selection with ``S_ij = |W_ij|``. It is the *per-row* magnitude baseline
(what Wanda reduces to with uniform activation norms), **not** the Wanda repository's unstructured
magnitude baseline, which uses one threshold over the whole layer (sparse.md §1.5).

Parameters, exactly one of:

* ``sparsity``: fraction of weights **removed**, in [0, 1) (unstructured);
* ``pattern: "N:M"``: **N kept** of every M consecutive inputs (``"2:4"`` keeps 2 of 4; quote it in
  YAML, where an unquoted 2:4 is the number 124);
* ``n_keep`` + ``m``: the same as numbers.

``storage: compact`` (2:4 only) stores the result as a :class:`~tensorpress.nn.modules.Sparse24Linear`
(kept values + 2-bit indices, run by the 2:4 kernel) instead of a dense weight with zeros (default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from ..nn import CompressedLinear, DenseLinear
from ..nn.modules import Sparse24Linear
from .base import Compressor, LinearContext, register
from .sparsity import SparsitySpec


@dataclass
class PruneParams:
    sparsity: float | None = None      # fraction removed (unstructured, per output row)
    pattern: str | None = None         # "N:M" = N kept of every M consecutive inputs
    n_keep: int | None = None          # N:M as numbers: weights KEPT per group ...
    m: int | None = None               # ... of m consecutive inputs
    storage: str = "dense"             # "dense" (zeros stored) or "compact" (2:4 only: values + 2-bit indices)


class PruneBase(Compressor):
    """Shared by the pruning compressors: the pattern parameters, layer checks, the output module."""

    Params = PruneParams

    def validate(self):
        p = self.params
        self.spec = SparsitySpec.from_params(self.name, p.sparsity, p.n_keep, p.m, p.pattern)
        if p.storage not in ("dense", "compact"):
            raise TensorpressError(f"storage must be 'dense' or 'compact', got {p.storage!r}")
        if p.storage == "compact" and (self.spec.n_keep, self.spec.m) != (2, 4):
            raise TensorpressError(f"storage 'compact' needs the 2:4 pattern, got {self.spec}")

    def check_layer(self, ctx: LinearContext):
        self.spec.check_in_features(ctx.original.in_features, ctx.name)

    def pruned_module(self, ctx: LinearContext, W: torch.Tensor) -> CompressedLinear:
        """A :class:`DenseLinear` holding the pruned weight (zeros stored) and the original bias, or with
        ``storage: compact`` a :class:`Sparse24Linear`."""
        if self.params.storage == "compact":
            m = Sparse24Linear.from_dense(W, bias=ctx.bias, dtype=ctx.dtype, name=ctx.name)
        else:
            m = DenseLinear(ctx.original.in_features, ctx.original.out_features, ctx.bias is not None, 0, ctx.dtype)
            m.weight.data.copy_(W)
            if ctx.bias is not None:
                m.bias.data.copy_(ctx.bias)
        m.pruned = True          # for a later stage of the chain: these zeros are a pattern (GPTQ keeps them)
        return m


class _MaskPruner(PruneBase):
    def scores(self, ctx: LinearContext, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, ctx: LinearContext):
        W = ctx.current_weight()                    # fp32: scores and selection in fp32 (sparse.md §0.6)
        return self.pruned_module(ctx, W.masked_fill(self.spec.mask(self.scores(ctx, W)), 0))


@register
class Wanda(_MaskPruner):
    name = "wanda"
    description = "Wanda: prune by |W|·‖X_j‖ per output row (unstructured) or per N:M group, no update"
    requires = frozenset({"input_norm"})

    def scores(self, ctx, W):
        return W.abs() * ctx.stats.input_norm().float()[None, :]


@register
class Magnitude(_MaskPruner):
    name = "magnitude"
    description = "magnitude pruning baseline: smallest |W| per output row (unstructured) or per N:M group"

    def scores(self, ctx, W):
        return W.abs()
