"""Round-to-nearest group-wise quantisation: the baseline every quantiser is measured against."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TensorpressError
from ..nn import QuantLinear
from .base import Compressor, LinearContext, check_number, register
from .quantizer import QuantSpec, quantize_groups


@dataclass
class QuantParams:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    clip_search: bool = False


def quant_spec(p) -> QuantSpec:
    check_number("bits", p.bits, 2, 8, integer=True)
    if not isinstance(p.sym, bool) or not isinstance(p.clip_search, bool):
        raise TensorpressError("sym and clip_search must be true or false")
    return QuantSpec(p.bits, p.group_size, p.sym, p.clip_search).validate()


@register
class RTN(Compressor):
    name = "rtn"
    description = "round-to-nearest integer weights, group-wise scales (2-8 bits, sym/asym)"
    requires = frozenset()
    Params = QuantParams

    def validate(self):
        self.spec = quant_spec(self.params)

    def check_layer(self, ctx: LinearContext):
        self.spec.validate(ctx.original.in_features)

    def compress(self, ctx: LinearContext):
        codes, scales, zeros = quantize_groups(ctx.current_weight(), self.spec)
        return QuantLinear.from_codes(codes, scales, zeros, bits=self.spec.bits, group_size=self.spec.group_size,
                                      sym=self.spec.sym, bias=ctx.bias, dtype=ctx.dtype)
