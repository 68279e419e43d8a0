"""Sparsity patterns and mask math shared by every pruning compressor (Wanda, magnitude, SparseGPT).

Conventions (docs: algorithms/sparse.md §0.5, §0.6, §6.1):

* A *prune mask* is a bool tensor shaped like the weight, ``True`` = the entry is set to zero.
* **N:M counts what is KEPT**: ``n_keep`` non-zeros out of every ``m`` weights (NVIDIA's reading;
  "2:4" keeps 2 of 4). The Wanda/SparseGPT reference code counts *zeros* per group instead; the two
  readings only agree for 2:4 and 4:8, so every name here says ``n_keep``.
* N:M groups are ``m`` **consecutive input weights of one output row**: columns ``m·g … m·g+m−1``
  of ``W [out, in]`` (the reduction dimension, the orientation of sparse tensor cores). ``in % m``
  must be 0.
* Unstructured sparsity is the fraction **removed**, ``s ∈ [0, 1)``; a group of ``d`` scores loses
  exactly ``⌊s·d⌋`` entries.
* Ties are broken deterministically: scores are sorted ascending with a *stable* sort, so among equal
  scores the lower index is pruned first (dead input channels, all-zero weights).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import TensorpressError
from .base import check_number


# --- masks ---------------------------------------------------------------------------------------------

def prune_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask of the ``k`` smallest scores in every row of ``scores [R, C]`` (stable: on ties the
    lower column is pruned first). Every row gets exactly ``k`` pruned entries."""
    if scores.dim() != 2 or not 0 <= k <= scores.shape[1]:
        raise ValueError(f"need 2-D scores and 0 <= k <= {scores.shape[-1]}, got shape "
                         f"{tuple(scores.shape)}, k={k}")
    idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)


def n_pruned(d: int, sparsity: float) -> int:
    """How many of ``d`` entries unstructured ``sparsity`` removes: ``⌊s·d⌋``.

    The epsilon keeps products that are integers on paper (0.3·10) from flooring one short when the
    float lands just below (0.29·100 = 28.999…)."""
    return min(d, int(math.floor(sparsity * d + 1e-9)))


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured, per output row: each row of ``scores [out, in]`` loses its ``⌊s·in⌋`` smallest."""
    return prune_smallest(scores, n_pruned(scores.shape[1], sparsity))


def nm_prune_mask(scores: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """N:M along the input dimension: in every row and every group of ``m`` consecutive columns of
    ``scores [out, in]``, keep the ``n_keep`` largest and prune the other ``m − n_keep``."""
    check_nm_args(n_keep, m)
    out_f, in_f = scores.shape
    if in_f % m:
        raise TensorpressError(f"N:M needs in_features divisible by m={m}, got {in_f}")
    return prune_smallest(scores.reshape(-1, m), m - n_keep).reshape(out_f, in_f)


def check_nm_args(n_keep, m) -> None:
    check_number("m", m, 1, integer=True)
    check_number("n_keep", n_keep, 1, integer=True)
    if n_keep > m:
        raise TensorpressError(f"n_keep ({n_keep}) must be <= m ({m}): n_keep counts the weights KEPT per group of m")


def check_nm(t: torch.Tensor, n_keep: int, m: int, name: str = "weight") -> None:
    """Raise a one-line :class:`TensorpressError` unless ``t [out, in]`` is N:M along the input dim.

    * a bool tensor is a **prune mask** and must prune exactly ``m − n_keep`` per group;
    * any other tensor is a **weight** and must have at most ``n_keep`` non-zeros per group (a kept
      weight may itself be zero, so "at most" is the only checkable statement).
    """
    check_nm_args(n_keep, m)
    if t.dim() != 2 or t.shape[1] % m:
        raise TensorpressError(f"{name}: {n_keep}:{m} needs a 2-D tensor with in_features divisible by {m}, "
                               f"got shape {tuple(t.shape)}")
    groups = t.reshape(t.shape[0], -1, m)
    if t.dtype == torch.bool:
        count = groups.sum(-1)
        bad = count != m - n_keep
        what = f"prunes {{}} of {m} (need exactly {m - n_keep})"
    else:
        count = (groups != 0).sum(-1)
        bad = count > n_keep
        what = f"has {{}} non-zeros (at most {n_keep} allowed)"
    where = bad.nonzero()
    if len(where):
        r, g = where[0].tolist()
        raise TensorpressError(f"{name} is not {n_keep}:{m}: row {r}, group {g} (inputs {m * g}..{m * g + m - 1}) "
                               + what.format(int(count[r, g])) + f"; {len(where)} bad group(s) in all")


def parse_pattern(pattern) -> tuple[int, int]:
    """``"N:M"`` → ``(n_keep, m)``: **N weights kept** out of every M (``"2:4"`` keeps 2 of 4)."""
    if not isinstance(pattern, str):
        hint = ""
        if isinstance(pattern, int):
            # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124.
            hint = " (quote it in YAML: an unquoted 2:4 is read as the number 124)"
        raise TensorpressError(f"pattern must be a string like \"2:4\", got {pattern!r}{hint}")
    # ASCII digits only: str.isdigit() accepts "²", which int() then rejects with a ValueError.
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*:\s*([0-9]{1,6})\s*", pattern)
    if match is None:
        raise TensorpressError(f"pattern must look like \"2:4\" (N kept of every M), got {pattern!r}")
    n_keep, m = int(match[1]), int(match[2])
    check_nm_args(n_keep, m)
    return n_keep, m


# --- the pattern a pruning stage asks for ------------------------------------------------------------

@dataclass(frozen=True)
class SparsitySpec:
    """Either unstructured ``sparsity`` (fraction removed) or N:M (``n_keep`` kept of every ``m``)."""
    sparsity: float | None = None
    n_keep: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.n_keep is not None

    @classmethod
    def from_params(cls, method: str, sparsity=None, n_keep=None, m=None, pattern=None) -> "SparsitySpec":
        """Resolve recipe parameters; exactly one of ``sparsity``, ``pattern`` or ``n_keep``+``m``."""
        given = [k for k, v in (("sparsity", sparsity), ("pattern", pattern),
                                ("n_keep/m", n_keep if n_keep is not None else m)) if v is not None]
        if len(given) != 1:
            raise TensorpressError(f"method '{method}' needs exactly one of 'sparsity' (fraction removed), "
                                   f"'pattern' (\"N:M\", N kept of M) or 'n_keep' + 'm'; got "
                                   f"{' and '.join(given) or 'none'}")
        if sparsity is not None:
            check_number("sparsity", sparsity, 0, 1, hi_open=True)
            return cls(sparsity=float(sparsity))
        if pattern is not None:
            n_keep, m = parse_pattern(pattern)
        elif n_keep is None or m is None:
            raise TensorpressError(f"method '{method}': N:M needs both 'n_keep' (weights kept per group) and 'm'")
        check_nm_args(n_keep, m)
        return cls(n_keep=n_keep, m=m)

    def check_in_features(self, in_features: int, name: str) -> None:
        if self.structured and in_features % self.m:
            raise TensorpressError(f"{name}: {self.n_keep}:{self.m} sparsity cannot apply, in_features "
                                   f"{in_features} is not divisible by m={self.m} (groups run along the input)")

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Prune mask for ``scores [out, in]``, compared per output row (unstructured) or per group."""
        if self.structured:
            return nm_prune_mask(scores, self.n_keep, self.m)
        return row_prune_mask(scores, self.sparsity)

    def __str__(self) -> str:
        return f"{self.n_keep}:{self.m}" if self.structured else f"{self.sparsity:g} unstructured"
