"""ARMOR (arXiv 2510.05528): a 2:4 core between two block-diagonal wrappers, ``Ŵ = A · (W' ⊙ M) · B``.

Implemented from docs/algorithms/sparse.md §4 only (the reference code is GPL-3.0; none of it is used).

* **Normalisation (NoWag):** ``W = diag(r) · W̄ · diag(c)`` with ``c_j = ‖W[:, j]‖ + 1e-5`` and
  ``r_i = ‖(W/c)[i, :]‖ + 1e-5``; everything is optimised on ``W̄``.
* **Proxy loss:** ``L = Σ_ij h_j (W̄ − A S B)_ij² / Σ_ij h_j W̄_ij²`` with ``h = diag(XᵀX)`` (invalid
  entries replaced by the mean of the valid ones), ``S = W' ⊙ M``. The diagonal weighting makes ``L``
  split into independent terms per (block-row, block-column) pair.
* **Initialisation = NoWag-P:** ``A = B = I``, ``W' = W̄``, ``M`` keeps the 2 largest ``h_j W̄_ij²``
  of every 4 consecutive inputs (Wanda's score on the normalised weight), so ``L_0`` is NoWag-P's loss.
* **Block coordinate descent**, per iteration: one joint Adam step (lr 1e-4) on A, B and W'; then a
  sparse-core step that, in every (p, q) block, samples one 4-group with probability ∝ the L1 norm of
  ``∂L/∂S`` there (uniform when that gradient is all zero) and re-solves it exactly over the 6
  possible 2-supports (2×2 least squares). Early stop after ``patience`` iterations without progress
  (``L_t > (1−1e-6)·L_{t−1}`` or ``L_t > L_{t−1} − 1e-8``).
* **Best iterate:** the Adam step can raise ``L``, so the best (A, B, W', M) seen is returned and
  compared once more in fp64 with the initial state: the returned proxy loss is never above NoWag-P's.
* **Output:** ``r`` and ``c`` are folded into the wrappers (``A_f = diag(r)·A``, ``B_f = B·diag(c)``) and
  the layer becomes a :class:`~tensorpress.nn.modules.Sparse24Linear` (compact 2:4 core + blocks).

Parameters: ``block_size`` (paper and replicate scripts 128; default 32, the reference yaml's, which
also divides the default model's 576/1536 dimensions), ``iterations`` (paper 20000; default 300, a fast
CPU setting — most of the paper's loss reduction happens in the first 2500), ``lr`` (paper 1e-4 for its
20000 steps; default 3e-3 for the short run: measured on real layers of the default model at 200-500
iterations, 1e-4 leaves most of the reachable loss on the table (q_proj relative output error 0.0188 at
1e-4, 0.0126 at 3e-3, 0.0106 after 2000 steps at 1e-4), 1e-2 gains nothing more), ``patience`` (100),
``seed`` (group sampling), ``pattern`` (only "2:4"). ``configs/armor-2of4-paper.yaml`` has the paper's.
Statistics are those of the dense model in the paper (``calibration: {stats_source: dense}``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import TensorpressError
from ..nn.modules import Sparse24Linear
from .base import Compressor, LinearContext, check_number, register
from .sparsity import nm_prune_mask, parse_pattern

NORM_EPS = 1e-5
# The 6 ways to keep 2 of 4, in the order the exact group solve enumerates them.
SUPPORTS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


def nowag_normalise(W: torch.Tensor):
    """``(W̄, r, c)`` with ``W = diag(r) W̄ diag(c)``: columns first, then rows (NoWag's order)."""
    c = W.norm(dim=0) + NORM_EPS
    W1 = W / c[None, :]
    r = W1.norm(dim=1) + NORM_EPS
    return W1 / r[:, None], r, c


def valid_hdiag(h: torch.Tensor) -> torch.Tensor:
    """Non-finite or non-positive entries (dead inputs) become the mean of the valid ones, so no
    column is ignored by the loss; all invalid gives ones (the loss is then plain Frobenius)."""
    h = h.double().clone()
    ok = torch.isfinite(h) & (h > 0)
    h[~ok] = h[ok].mean() if bool(ok.any()) else 1.0
    return h


def nowag_keep_mask(Wbar: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """NoWag-P 2:4 keep mask (``True`` = kept): top-2 ``h_j W̄_ij²`` per 4 consecutive inputs."""
    return ~nm_prune_mask(Wbar.double() ** 2 * h.double()[None, :], 2, 4)


def wrap(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``blockdiag(A) · S · blockdiag(B)`` for blocks ``A [P, b, b]``, ``B [Q, b, b]``, ``S [P·b, Q·b]``,
    without ever forming the block-diagonal matrices."""
    P, b, _ = A.shape
    Q = B.shape[0]
    AS = torch.einsum("pik,pkql->piql", A, S.reshape(P, b, Q, b))
    return torch.einsum("piql,qlm->piqm", AS, B).reshape(P * b, Q * b)


def proxy_loss(Wbar, h, A, S, B) -> torch.Tensor:
    """The normalised NoWag proxy ``Σ h_j (W̄ − A S B)² / Σ h_j W̄²`` (0 when ``W̄`` is 0)."""
    num = ((Wbar - wrap(A, S, B)) ** 2 * h[None, :]).sum()
    den = (Wbar ** 2 * h[None, :]).sum()
    return num / den if float(den) > 0 else num * 0


@dataclass
class ArmorResult:
    core: torch.Tensor          # S = W' ⊙ M [out, in], exactly 2:4, normalised scale
    armor_a: torch.Tensor       # A_f = diag(r)·A as blocks [out/b, b, b]
    armor_b: torch.Tensor       # B_f = B·diag(c) as blocks [in/b, b, b]
    keep: torch.Tensor          # bool [out, in], exactly 2 True per group of 4
    loss_init: float            # NoWag-P proxy loss (fp64)
    loss: float                 # proxy loss of the returned state (fp64), <= loss_init
    iterations: int             # iterations run (early stop may end before the budget)
    history: list = field(default_factory=list)   # proxy loss after every iteration (fp32 bookkeeping)

    def weight(self) -> torch.Tensor:
        return wrap(self.armor_a, self.core, self.armor_b)


def _sparse_core_step(Wbar, h, A, B, Wp, keep, gen):
    """One exact re-solve of one sampled 4-group per (p, q) block, in place on ``Wp`` and ``keep``.
    Returns the proxy-loss numerator after the step (fp64 scalar)."""
    P, b, _ = A.shape
    Q = h.numel() // b
    S = Wp * keep
    E = wrap(A, S, B) - Wbar
    # ∂L/∂S up to a positive factor: only used to rank groups, and pruned positions count too.
    G = wrap(A.transpose(1, 2), E * h[None, :], B.transpose(1, 2))
    ng = b // 4
    score = G.abs().reshape(P, b, Q, ng, 4).sum(-1).permute(0, 2, 1, 3).reshape(P * Q, b * ng).double()
    score[score.sum(1) == 0] = 1        # an all-zero block gradient: sample uniformly there
    # Sampling ∝ score by inverting the CDF: the same law as torch.multinomial, several times cheaper.
    cdf = score.cumsum(1)
    u = torch.rand(P * Q, 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(b * ng - 1)
    p = torch.arange(P).repeat_interleave(Q)
    q = torch.arange(Q).repeat(P)
    ii, gg = pick // ng, pick % ng
    rows = p * b + ii
    cols = (q * b + 4 * gg)[:, None] + torch.arange(4)                   # [PQ, 4]
    local = (4 * gg)[:, None] + torch.arange(4)
    s_old = S[rows[:, None], cols]                                       # [PQ, 4]
    a = A[p, :, ii]                                                      # column of A_p hitting row i
    Bg = B[q[:, None], local]                                            # [PQ, 4, b]: rows of B_q for the group
    sqh = h.sqrt().reshape(Q, b)[q]                                      # [PQ, b]
    Eblk = E.reshape(P, b, Q, b).permute(0, 2, 1, 3).reshape(P * Q, b, b)
    # Weighted residual of each block with its selected group zeroed (each block holds one group).
    R = (Eblk - a[:, :, None] * (s_old[:, None, :] @ Bg)) * sqh[:, None, :]
    Bt = (Bg * sqh[:, None, :]).double()
    g = (Bt @ (R.transpose(1, 2) @ a[:, :, None]).double()).squeeze(-1)  # Bt Rᵀ a
    G4 = Bt @ Bt.transpose(1, 2)
    aa = (a.double() ** 2).sum(1) + 1e-8
    G2 = G4[:, SUPPORTS[:, :, None], SUPPORTS[:, None, :]] + 1e-9 * torch.eye(2, dtype=torch.float64)
    g2 = g[:, SUPPORTS]                                                  # [PQ, 6, 2]
    sol = torch.linalg.solve(G2, g2.unsqueeze(-1)).squeeze(-1)           # G4[P,P]⁻¹ g_P
    dL = -(g2 * sol).sum(-1) / aa[:, None]                               # ΔL(P), [PQ, 6]
    best = dL.argmin(1)
    n = torch.arange(P * Q)
    sup = SUPPORTS[best]                                                 # [PQ, 2]
    vals = torch.zeros(P * Q, 4, dtype=torch.float64)
    vals.scatter_(1, sup, -sol[n, best] / aa[:, None])
    kg = torch.zeros(P * Q, 4, dtype=torch.bool).scatter_(1, sup, True)
    keep[rows[:, None], cols] = kg
    Wp[rows[:, None], cols] = vals.to(Wp.dtype)
    return R.pow(2).sum(dtype=torch.float64) + dL[n, best].sum()


def armor_factorise(W: torch.Tensor, h: torch.Tensor, *, block_size: int = 32, iterations: int = 300,
                    lr: float = 3e-3, patience: int = 100, seed: int = 0) -> ArmorResult:
    """Run ARMOR on ``W [out, in]`` with input statistic ``h = diag(XᵀX) [in]`` (any positive scale)."""
    out_f, in_f = W.shape
    b = block_size
    if b % 4 or in_f % b or out_f % b:
        raise TensorpressError(f"ARMOR block size {b} must be a multiple of 4 dividing both dimensions "
                               f"of the {out_f}x{in_f} weight")
    Wbar, r, c = nowag_normalise(W.double())
    hd = valid_hdiag(h)
    keep = nowag_keep_mask(Wbar, hd)
    Wbar64, Wbar, h32 = Wbar, Wbar.float(), hd.float()
    eye = torch.eye(b)
    A = eye.repeat(out_f // b, 1, 1).requires_grad_()
    B = eye.repeat(in_f // b, 1, 1).requires_grad_()
    Wp = Wbar.clone().requires_grad_()
    init = (A.detach().clone(), B.detach().clone(), Wp.detach().clone(), keep.clone())
    den = float((Wbar64 ** 2 * hd[None, :]).sum())

    def exact(state) -> float:
        A_, B_, Wp_, k_ = state
        return float(proxy_loss(Wbar64, hd, A_.double(), (Wp_ * k_).double(), B_.double()))

    loss_init = exact(init)
    best_state, best_loss, prev = init, loss_init, loss_init
    history, left, t = [], patience, 0
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([A, B, Wp], lr=lr)
    if den == 0:
        iterations = 0                  # an all-zero weight: nothing to fit
    for t in range(1, iterations + 1):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():          # the pipeline compresses under no_grad
            proxy_loss(Wbar, h32, A, Wp * keep, B).backward()
        opt.step()
        with torch.no_grad():
            loss = float(_sparse_core_step(Wbar, h32, A.detach(), B.detach(), Wp.data, keep, gen)) / den
        history.append(loss)
        if loss < best_loss:
            best_loss = loss
            best_state = (A.detach().clone(), B.detach().clone(), Wp.detach().clone(), keep.clone())
        progressed = not (loss > (1 - 1e-6) * prev or loss > prev - 1e-8)
        left = patience if progressed else left - 1
        prev = loss
        if left <= 0:
            break
    # The tracked losses are fp32 bookkeeping; the guarantee is checked once more in fp64.
    final = exact(best_state)
    if final > loss_init:
        best_state, final = init, loss_init
    A_, B_, Wp_, k_ = best_state
    rb, cb = r.float().reshape(-1, b), c.float().reshape(-1, b)
    return ArmorResult(core=(Wp_ * k_).float(), armor_a=A_ * rb[:, :, None], armor_b=B_ * cb[:, None, :],
                       keep=k_, loss_init=loss_init, loss=final, iterations=t, history=history)


@dataclass
class ArmorParams:
    block_size: int = 32            # wrapper block b (paper: 128; the reference yaml and this default: 32)
    iterations: int = 300           # BCD iterations (paper: 20000; 300 is a fast CPU default)
    lr: float = 3e-3                # Adam learning rate (paper: 1e-4 over 20000 steps; larger for short runs)
    patience: int = 100             # iterations without progress before stopping (paper)
    seed: int = 0                   # group sampling of the sparse-core step
    pattern: str = "2:4"            # the only pattern ARMOR's exact group solve handles


@register
class Armor(Compressor):
    name = "armor"
    description = "ARMOR: 2:4 core between block-diagonal wrappers, A·(W'⊙M)·B, fitted by block coordinate descent"
    requires = frozenset({"gram"})
    Params = ArmorParams

    def validate(self):
        p = self.params
        if parse_pattern(p.pattern) != (2, 4):
            raise TensorpressError(f"armor supports only the 2:4 pattern (2 kept of every 4), got {p.pattern!r}")
        check_number("block_size", p.block_size, 4, integer=True)
        if p.block_size % 4:
            raise TensorpressError(f"armor block_size must be a multiple of 4, got {p.block_size}")
        check_number("iterations", p.iterations, 0, integer=True)
        check_number("lr", p.lr, 0)
        check_number("patience", p.patience, 1, integer=True)
        check_number("seed", p.seed, 0, integer=True)

    def check_layer(self, ctx: LinearContext):
        m, b = ctx.original, self.params.block_size
        if m.in_features % b or m.out_features % b:
            raise TensorpressError(f"{ctx.name}: armor block_size {b} does not divide the layer's "
                                   f"{m.out_features}x{m.in_features} dimensions")

    def compress(self, ctx: LinearContext):
        p = self.params
        res = armor_factorise(ctx.current_weight(), ctx.stats.gram().diagonal(), block_size=p.block_size,
                              iterations=p.iterations, lr=p.lr, patience=p.patience, seed=p.seed)
        return Sparse24Linear.from_dense(res.core, res.armor_a, res.armor_b, ctx.bias, ctx.dtype, ctx.name)
