"""GPTQ (Frantar et al., arXiv 2210.17323): column-by-column quantisation with second-order error
feedback through the upper Cholesky factor of ``H⁻¹``, in lazy blocks.

Differences from the IST-DASLab reference, on purpose:
* dynamic group parameters are computed from the *updated* columns of the current block (the
  reference reads stale global columns when the group is smaller than the block);
* a failed Cholesky is retried with 10× more damping (up to 4 times) instead of crashing;
* optional clipping search for group ranges (``clip_search``), weighted by ``diag(H)``;
* after a pruning stage (Wanda, SparseGPT) the pruned entries stay zero (``keep``): they are stored
  as the zero-point code (exactly 0) and their error, like every other, is fed back into the later
  columns, so "Wanda 2:4 → GPTQ w4" is still 2:4 (``preserve_sparsity``, default true). Without it
  the feedback fills the zeros and the pattern is silently lost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from ..nn import QuantLinear
from .base import Compressor, LinearContext, check_number, register
from .quantizer import QuantSpec, find_params, quantize
from .rtn import quant_spec


def _hinv_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp·mean(diag H)``; retries with more damping."""
    # Memory: at most three n×n matrices besides H at any moment (a 28672-wide down_proj's fp64
    # Hessian is 6.6 GB, so every extra copy matters on big models).
    mean_diag = H.diagonal().mean()
    for attempt in range(5):
        Hd = H.clone()
        Hd.diagonal().add_((damp * 10**attempt) * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U
    raise TensorpressError("GPTQ: the Hessian stays singular after damping; use more calibration data")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                  overwrite_h: bool = False, keep: torch.Tensor | None = None):
    """Quantise ``W [out, in]`` given ``H ∝ XᵀX``.

    Returns ``codes [out, in]`` (int32, original column order), ``scales [G, out]``,
    ``zeros [G, out]`` and ``g_idx [in]`` (``None`` when groups are contiguous). ``overwrite_h``
    lets the function use a float64 ``H`` the caller no longer needs as its workspace. ``keep``
    (bool ``[out, in]``, optional): the entries that may be non-zero; the others are stored as the
    zero-point code (dequantised exactly 0), their error fed back like any other.
    """
    W = W.float().clone()
    out_f, in_f = W.shape
    if keep is not None:
        if keep.shape != W.shape:
            raise ValueError(f"keep mask {tuple(keep.shape)} does not match the weight {tuple(W.shape)}")
        keep = keep.bool()
        W.masked_fill_(~keep, 0)
    H = H.double() if overwrite_h else H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = spec.group(in_f)
    n_groups = spec.n_groups(in_f)
    hdiag = H.diagonal().float()

    static = None
    if static_groups:
        static = [find_params(W[:, j:j + g], spec, hdiag[j:j + g]) for j in range(0, in_f, g)]
    perm = torch.argsort(hdiag, descending=True) if act_order else torch.arange(in_f)
    if act_order:
        W, H, hdiag = W[:, perm], H[perm][:, perm], hdiag[perm]
        keep = None if keep is None else keep[:, perm]
    hd = hdiag
    U = _hinv_upper(H, damp).float()
    del H

    # Blocks are a multiple of the group so that every dynamic group lies inside one block.
    if spec.group_size != -1:
        block_size = g * max(1, block_size // g)
    codes = torch.zeros(out_f, in_f, dtype=torch.int32)
    scales = torch.zeros(n_groups, out_f)
    zeros = torch.zeros(n_groups, out_f)
    g_idx_perm = torch.zeros(in_f, dtype=torch.int32)
    if spec.group_size == -1 and static is None:
        s, z = find_params(W, spec, hd)
        scales[0], zeros[0] = s[:, 0], z[:, 0]
    maxq = spec.maxq
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        K1 = None if keep is None else keep[:, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                gid = int(perm[col]) // g
                s, z = static[gid]
                scales[gid], zeros[gid] = s[:, 0], z[:, 0]
            else:
                gid = col // g
                if spec.group_size != -1 and col % g == 0:
                    s, z = find_params(W1[:, i:i + g], spec, hd[col:col + g])
                    scales[gid], zeros[gid] = s[:, 0], z[:, 0]
                s, z = scales[gid], zeros[gid]
                s, z = s[:, None], z[:, None]
            g_idx_perm[col] = gid
            w = W1[:, i]
            q = quantize(w[:, None], s, z, maxq)
            if K1 is not None:
                # A pruned entry is stored as the zero point (exactly 0). The feedback of earlier
                # columns has moved it away from 0, so its error (w - 0) is propagated like any
                # other: pruning and quantisation in one OBS sweep, as SparseGPT's joint mode. Zeroing
                # the feedback instead would discard it (measured: then GPTQ gains 4 % over RTN, not ~45 %).
                q = torch.where(K1[:, i:i + 1], q, z.expand_as(q))
            codes[:, col] = q[:, 0].to(torch.int32)
            err = (w - (s * (q - z))[:, 0]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv]
    g_idx = g_idx_perm[inv]
    contiguous = torch.equal(g_idx.long(), torch.arange(in_f) // g)
    return codes, scales, zeros.to(torch.int32), (None if contiguous else g_idx)


@dataclass
class GPTQParams:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    clip_search: bool = False
    preserve_sparsity: bool = True       # after a pruning stage: its zeros stay zeros (the N:M pattern survives)


@register
class GPTQ(Compressor):
    name = "gptq"
    description = "GPTQ: second-order error feedback (damping, act-order, static groups)"
    requires = frozenset({"gram"})
    Params = GPTQParams

    def validate(self):
        p = self.params
        self.spec = quant_spec(p)
        check_number("damp", p.damp, 0, 1, lo_open=True)
        check_number("block_size", p.block_size, 1, integer=True)
        for k in ("act_order", "static_groups", "preserve_sparsity"):
            if not isinstance(getattr(p, k), bool):
                raise TensorpressError(f"{k} must be true or false")

    def check_layer(self, ctx: LinearContext):
        self.spec.validate(ctx.original.in_features)

    def keep_mask(self, ctx: LinearContext, W: torch.Tensor) -> torch.Tensor | None:
        """The non-zeros of a pruning stage's output (it marks its modules ``pruned``), else None: the
        zeros of a dense model's own weights (a GGUF-derived model has many) are not a pattern."""
        if self.params.preserve_sparsity and getattr(ctx.current, "pruned", False):
            return W != 0
        return None

    def compress(self, ctx: LinearContext):
        p = self.params
        W = ctx.current_weight()
        codes, scales, zeros, g_idx = gptq_quantize(W, ctx.stats.gram(), self.spec, p.damp,
                                                    p.act_order, p.static_groups, p.block_size,
                                                    overwrite_h=True,      # gram() is a fresh copy
                                                    keep=self.keep_mask(ctx, W))
        return QuantLinear.from_codes(codes, scales, zeros, bits=self.spec.bits, group_size=self.spec.group_size,
                                      sym=self.spec.sym, g_idx=g_idx, bias=ctx.bias, dtype=ctx.dtype)
