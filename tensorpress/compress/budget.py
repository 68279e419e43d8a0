"""Rank budgets for low-rank stages (factorisations and corrections).

A low-rank stage takes exactly one of:

* ``rank: r`` — the same rank in every layer it targets;
* ``ratio: ρ`` — per layer, the two factors hold the fraction ρ of the layer's parameters
  (**kept** for a factorisation, **added** for a correction): ``r = ⌊ρ·out·in/(out+in)⌋``;
* ``budget: {params: ρ}`` or ``budget: {bits_per_weight: b}`` — one budget over every layer the
  stage targets, allocated by ``allocation``:

  - ``uniform`` (default): every layer gets the ratio ρ (``b`` divided by the bits of one stored
    factor element), i.e. the same as ``ratio: ρ``;
  - ``sensitivity``: ranks chosen to minimise the sum over layers of the *relative* truncation
    error measured on the calibration data in the method's own metric (the tail energy of its
    weighted spectrum, e.g. the calibration output error for SVD-LLM), subject to the budget.
    Tail energies are convex in the rank, so the greedy choice of the largest error drop per
    stored bit is optimal up to the last partial step. Needs one extra calibration pass.

A budget that cannot be met (below rank 1 everywhere, above what factors can hold) is a clear
error before any layer is compressed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from .base import Compressor, LinearContext, check_number
from .lowrank import rank_from_ratio, resolve_rank

ALLOCATIONS = ("uniform", "sensitivity")
BUDGET_KEYS = ("params", "bits_per_weight")


@dataclass
class BudgetParams:
    ratio: float | None = None       # fraction of the layer's parameters kept (factorisation) / added (correction)
    rank: int | None = None
    budget: dict | None = None       # {params: ρ} or {bits_per_weight: b} over all targeted layers
    allocation: str = "uniform"      # how a budget is split: uniform | sensitivity


@dataclass
class LayerShape:
    name: str
    out_features: int
    in_features: int
    factor_bits: int                 # bits of one stored factor element


class LowRankStage(Compressor):
    """A stage whose output is a rank-``r`` term: rank from ``rank``/``ratio``/``budget``."""

    Params = BudgetParams

    def validate(self):
        p = self.params
        given = [k for k in ("ratio", "rank", "budget") if getattr(p, k) is not None]
        if len(given) != 1:
            raise TensorpressError(f"method '{self.name}' needs exactly one of 'rank', 'ratio' or 'budget'"
                                   + (f" (got {', '.join(given)})" if given else ""))
        if p.ratio is not None:
            check_number("ratio", p.ratio, 0, 1, lo_open=True)
        if p.rank is not None:
            check_number("rank", p.rank, 1, integer=True)
        if p.budget is not None:
            b = p.budget
            if not isinstance(b, dict) or len(b) != 1 or next(iter(b)) not in BUDGET_KEYS:
                raise TensorpressError(f"budget must be a mapping with one key, {' or '.join(BUDGET_KEYS)} "
                                       f"(e.g. budget: {{params: 0.8}}), got {b!r}")
            k, v = next(iter(b.items()))
            check_number(f"budget.{k}", v, 0, None, lo_open=True)
        if p.allocation not in ALLOCATIONS:
            raise TensorpressError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {p.allocation!r}")
        if p.allocation != "uniform" and p.budget is None:
            raise TensorpressError(f"allocation '{p.allocation}' needs a 'budget' (with 'rank' or 'ratio' "
                                   f"every layer's rank is fixed)")
        self.allocated: dict[str, int] = {}

    # --- what the pipeline asks -------------------------------------------------------------------
    @property
    def needs_allocation(self) -> bool:
        return self.params.budget is not None

    @property
    def needs_sensitivity(self) -> bool:
        return self.params.budget is not None and self.params.allocation == "sensitivity"

    def factor_bits(self, ctx: LinearContext) -> int:
        """Bits of one stored factor element (the module dtype for factorisations)."""
        return torch.finfo(ctx.dtype).bits

    def max_rank(self, out_f: int, in_f: int) -> int:
        """Largest useful rank: a factorisation never stores more than the dense weight."""
        if self.role == "correction":
            return min(out_f, in_f)
        return max(1, min(min(out_f, in_f), out_f * in_f // (out_f + in_f)))

    def spectrum(self, ctx: LinearContext) -> torch.Tensor:
        """Squared singular values (descending) of the matrix this stage truncates, in its metric."""
        raise TensorpressError(f"method '{self.name}' has no sensitivity measure; use allocation: uniform")

    def rank_for(self, ctx: LinearContext) -> int:
        p = self.params
        if p.budget is not None:
            if ctx.name not in self.allocated:
                raise TensorpressError(f"{ctx.name}: the '{self.name}' budget was not allocated "
                                       f"(compress through tensorpress.compress, which allocates it)")
            return self.allocated[ctx.name]
        m = ctx.original
        return resolve_rank(m.out_features, m.in_features, p.rank, p.ratio, ctx.name)

    def check_layer(self, ctx: LinearContext):
        if self.params.budget is None:
            self.rank_for(ctx)

    # --- allocation -------------------------------------------------------------------------------
    def allocate(self, layers: list[LayerShape], spectra: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        """Ranks for ``layers`` under this stage's budget; stored in ``self.allocated`` and returned."""
        k, v = next(iter(self.params.budget.items()))
        weights = sum(l.out_features * l.in_features for l in layers)
        if k == "params":
            budget_bits = sum(v * l.out_features * l.in_features * l.factor_bits for l in layers)
        else:
            budget_bits = v * weights
        if self.params.allocation == "uniform":
            ranks = {}
            for l in layers:
                rho = v if k == "params" else v / l.factor_bits
                r = rank_from_ratio(l.out_features, l.in_features, rho)
                if r > self.max_rank(l.out_features, l.in_features):
                    raise TensorpressError(
                        f"budget {k}={v} cannot be met: {l.name} would need rank {r} > "
                        f"{self.max_rank(l.out_features, l.in_features)}"
                        + ("" if self.role == "correction" else " (a factorisation cannot hold more than the dense weight)"))
                ranks[l.name] = r
        else:
            ranks = _greedy(layers, spectra or {}, budget_bits, self.max_rank, f"budget {k}={v}")
        self.allocated = ranks
        return ranks


def _greedy(layers, spectra, budget_bits, max_rank, what) -> dict[str, int]:
    """Largest drop of relative tail energy per stored bit first; every layer keeps rank ≥ 1."""
    cost = {l.name: (l.out_features + l.in_features) * l.factor_bits for l in layers}
    floor = sum(cost.values())
    cap = sum(max_rank(l.out_features, l.in_features) * cost[l.name] for l in layers)
    if budget_bits < floor:
        raise TensorpressError(f"{what} cannot be met: rank 1 in every targeted layer already needs "
                               f"{floor / budget_bits:.2f}× the budget")
    if budget_bits > cap * (1 + 1e-9):
        raise TensorpressError(f"{what} cannot be met: it exceeds what full-rank factors of the targeted "
                               f"layers hold ({budget_bits / cap:.2f}×)")
    gains, names, ks = [], [], []
    for l in layers:
        s = spectra.get(l.name)
        if s is None:
            raise TensorpressError(f"no sensitivity measured for {l.name}")
        s = s.double().clamp_min(0)
        tot = float(s.sum())
        rmax = max_rank(l.out_features, l.in_features)
        p = (s[1:rmax] / tot) if tot > 0 else torch.zeros(max(rmax - 1, 0), dtype=torch.float64)
        gains.append(p / cost[l.name])
        names += [l.name] * p.numel()
        ks.append(torch.arange(1, p.numel() + 1))
    g = (torch.cat(gains) if gains else torch.zeros(0)).tolist()
    k_all = (torch.cat(ks) if ks else torch.zeros(0, dtype=torch.long)).tolist()
    # Sort by gain (desc), then by index within the layer (asc) so ties keep prefixes in order.
    order = sorted(range(len(g)), key=lambda i: (-g[i], k_all[i]))
    ranks = {l.name: 1 for l in layers}
    closed: set = set()
    left = budget_bits - floor
    for i in order:
        n = names[i]
        if n in closed:
            continue
        if k_all[i] != ranks[n] or cost[n] > left:
            closed.add(n)             # a layer's ranks are a prefix: once one step is skipped, stop it
            continue
        ranks[n] += 1
        left -= cost[n]
        if left < min(cost.values()):
            break
    return ranks

