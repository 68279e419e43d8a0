"""The compressor interface and its registry.

A compressor is one *stage* of a recipe. It declares the statistics it needs (``requires``) and
turns one linear into a compressed module (``compress``). Stages compose per module in recipe
order: a ``base`` stage replaces the weight (prune, quantise, factorise); a ``correction`` stage
(EoRA-style) adds a low-rank term to whatever base came before it and needs one.

Parameters are a dataclass per compressor (``Params``): unknown keys and out-of-range values are
rejected with a one-line :class:`TensorpressError` when the recipe is built, before any work.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..calib.collectors import LinearStats
from ..errors import TensorpressError

REGISTRY: dict[str, type["Compressor"]] = {}


@dataclass
class LinearContext:
    """Everything a stage sees for one linear."""
    name: str                       # full module name, e.g. model.layers.3.self_attn.q_proj
    original: nn.Module             # the dense nn.Linear as it was before any stage
    current: nn.Module              # output of the previous stage (the original for the first)
    stats: LinearStats

    @property
    def weight(self) -> torch.Tensor:
        """fp32 copy of the original dense weight ``[out, in]``."""
        return self.original.weight.detach().float().clone()

    def current_weight(self) -> torch.Tensor:
        """fp32 dense weight of the previous stage's output (what this stage should compress)."""
        cur = self.current
        if hasattr(cur, "effective_weight"):
            return cur.effective_weight().float().clone()
        return cur.weight.detach().float().clone()

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.original.bias
        return None if b is None else b.detach().clone()

    @property
    def dtype(self) -> torch.dtype:
        return self.original.weight.dtype


class Compressor:
    name: ClassVar[str]
    role: ClassVar[str] = "base"                   # "base" | "correction"
    requires: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""

    @dataclass
    class Params:
        pass

    def __init__(self, **params: Any):
        fields = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise TensorpressError(f"unknown parameter(s) {', '.join(unknown)} for method '{self.name}'; "
                                   f"valid: {', '.join(sorted(fields)) or 'none'}")
        try:
            self.params = self.Params(**params)
        except TypeError as e:
            raise TensorpressError(f"bad parameters for method '{self.name}': {e}") from None
        self.validate()

    def validate(self) -> None:
        """Check parameter values; raise TensorpressError with a clear message."""

    def check_layer(self, ctx: LinearContext) -> None:
        """Check that the stage can apply to this layer (e.g. rank ≤ min(out, in))."""

    def compress(self, ctx: LinearContext) -> nn.Module:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self.params)}


def register(cls: type[Compressor]) -> type[Compressor]:
    if cls.name in REGISTRY:
        raise ValueError(f"compressor {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_compressor(name: str) -> type[Compressor]:
    if name not in REGISTRY:
        raise TensorpressError(f"unknown method '{name}'; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def check_number(name: str, value, lo=None, hi=None, integer=False, lo_open=False, hi_open=False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise TensorpressError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    # NaN passes every comparison below and inf breaks rank/size arithmetic later: refuse both here.
    if not math.isfinite(value):
        raise TensorpressError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise TensorpressError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise TensorpressError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
