"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): one-shot pruning with OBS weight updates.

Columns are processed left to right through the upper Cholesky factor ``U`` of ``H⁻¹`` (``UᵀU = H⁻¹``,
``H`` the calibration Gram, damped by ``damp·mean(diag H)``; the same factor and damping retry as
GPTQ). Pruning column ``c`` spreads its error over the later columns of its block; finished blocks
update the rest of the matrix in one lazy GEMM (docs: algorithms/sparse.md §2).

Mask selection, as in the reference:

* **unstructured:** one comparison group per ``block_size``-column block **across all rows**, score
  ``w²/U_cc²`` from the block's weights as updated by the earlier blocks;
* **N:M:** per row and group of ``m`` columns, chosen lazily when the group's first column is
  reached, i.e. on the weights already updated by the columns before it.

Deliberate difference: the reference's unstructured threshold ``score <= sorted[int(numel·s)]``
prunes at least one entry more than asked (more on ties). Here each block loses exactly
``⌊s·numel⌋`` entries (stable order, lower flat index first on ties), so ``sparsity: 0`` returns ``W``.

Pattern parameters are those of :mod:`tensorpress.compress.wanda` (``sparsity`` | ``pattern`` |
``n_keep`` + ``m``), plus ``block_size`` (columns per lazy block, 128; rounded down to a multiple of
``m`` for N:M so that no group straddles two blocks) and ``damp`` (0.01).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from .base import LinearContext, check_number, register
from .gptq import _hinv_upper
from .sparsity import SparsitySpec, n_pruned, nm_prune_mask, prune_smallest
from .wanda import PruneBase, PruneParams


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, spec: SparsitySpec, *, block_size: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """Prune ``W [out, in]`` to ``spec`` given ``H ∝ XᵀX [in, in]``; returns the fp32 pruned weight."""
    W = W.float().clone()
    out_f, in_f = W.shape
    spec.check_in_features(in_f, "sparsegpt")
    H = H.double().clone()
    # Inputs that never fire carry no information: their weights are zeroed (free sparsity) and a
    # unit diagonal keeps the factorisation well-posed, as GPTQ does.
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    try:
        U = _hinv_upper(H, damp).float()
    except TensorpressError:
        raise TensorpressError("sparsegpt: the Hessian stays singular after damping; "
                               "use more calibration data") from None
    if spec.structured:
        block_size = spec.m * max(1, block_size // spec.m)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        if spec.structured:
            prune = torch.zeros_like(W1, dtype=torch.bool)
        else:
            # OBS saliency w²/[H⁻¹]_cc, with [H⁻¹]_cc read as U_cc² of the *remaining* problem.
            sc = (W1 / d[None, :]) ** 2
            prune = prune_smallest(sc.reshape(1, -1), n_pruned(sc.numel(), spec.sparsity)).reshape(sc.shape)
        for c in range(i2 - i1):
            if spec.structured and c % spec.m == 0:
                g = slice(c, c + spec.m)
                prune[:, g] = nm_prune_mask((W1[:, g] / d[None, g]) ** 2, spec.n_keep, spec.m)
            w = W1[:, c]
            # Joint quantisation would round the kept entries of q here, before the error is formed.
            q = w.masked_fill(prune[:, c], 0)
            err = (w - q) / d[c]
            W1[:, c:] -= err[:, None] * U1[c, c:][None, :]
            Q1[:, c] = q
            E1[:, c] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W


@dataclass
class SparseGPTParams(PruneParams):
    block_size: int = 128
    damp: float = 0.01


@register
class SparseGPT(PruneBase):
    name = "sparsegpt"
    description = "SparseGPT: OBS weight updates through the damped inverse Gram, per-block / N:M masks"
    requires = frozenset({"gram"})
    Params = SparseGPTParams

    def validate(self):
        super().validate()
        check_number("block_size", self.params.block_size, 1, integer=True)
        check_number("damp", self.params.damp, 0, 1, lo_open=True)

    def compress(self, ctx: LinearContext):
        p = self.params
        try:
            W = sparsegpt_prune(ctx.current_weight(), ctx.stats.gram(), self.spec, block_size=p.block_size,
                                damp=p.damp)
        except TensorpressError as e:
            raise TensorpressError(f"{ctx.name}: {e}") from None
        return self.pruned_module(ctx, W)
