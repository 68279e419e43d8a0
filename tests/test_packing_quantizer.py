"""The one packer and the one quantiser: layouts and the grid properties of the docs."""
import pytest
import torch

from tensorpress.compress.quantizer import QuantSpec, find_params, quantize_groups
from tensorpress.errors import TensorpressError
from tensorpress.nn import QuantLinear
from tensorpress.packing import pack_bits, packed_length, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [1, 7, 8, 31, 32, 33, 100])
def test_pack_round_trip_both_dims(bits, length):
    g = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 2**bits, (length, 5), generator=g)
    p0 = pack_bits(codes, bits, 0)
    assert p0.dtype == torch.int32 and p0.shape == (packed_length(length, bits), 5)
    assert torch.equal(unpack_bits(p0, bits, length, 0), codes.int())
    p1 = pack_bits(codes.T, bits, 1)
    assert torch.equal(unpack_bits(p1, bits, length, 1), codes.T.int())


def test_gptq_nibble_order():
    # GPTQ 4-bit: input element k at bits 4*(k%8) of word k//8.
    codes = torch.tensor([[0], [1], [2], [3], [4], [5], [6], [7], [15]])
    p = pack_bits(codes, 4, 0)
    assert p[0, 0].item() & 0xFFFFFFFF == 0x76543210
    assert p[1, 0].item() == 15
    # 3-bit is one straddling LSB-first stream: value 10 spans words 0 and 1.
    c3 = torch.zeros(32, 1, dtype=torch.long); c3[10] = 0b111
    p3 = pack_bits(c3, 3, 0)
    assert (p3[0, 0].item() & 0xFFFFFFFF) >> 30 == 0b11 and p3[1, 0].item() & 1 == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,group", [(128, 32), (100, 32), (96, -1)])
def test_rtn_grid_properties(bits, sym, in_f, group):
    torch.manual_seed(bits)
    w = torch.randn(24, in_f) * torch.rand(24, 1) * 3
    spec = QuantSpec(bits, group, sym).validate(in_f)
    codes, scales, zeros = quantize_groups(w, spec)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert scales.shape == (spec.n_groups(in_f), 24)
    if sym:
        assert torch.all(zeros == 2 ** (bits - 1))
    # scales are stored as fp16: the grid the codes were chosen on must be exactly representable
    assert torch.equal(scales.half().float(), scales)
    m = QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group, sym=sym)
    w_hat = m.base_weight()
    gi = torch.arange(in_f) // spec.group(in_f)
    s, z = scales[gi].T, zeros[gi].T.float()
    # every dequantised weight lies on its group's grid ...
    q = w_hat / s + z
    assert torch.allclose(q, q.round(), atol=1e-4)
    # ... and round-to-nearest error is at most half a step: the range covers every weight
    # (asymmetric: the integer zero point shifts the grid by up to half a step, so one step)
    assert torch.all((w - w_hat).abs() <= (s / 2 if sym else s) + 1e-6)


def test_zero_group_and_clip_search():
    w = torch.zeros(4, 64)
    w[:, 32:] = torch.randn(4, 32)
    codes, scales, zeros = quantize_groups(w, QuantSpec(4, 32, True))
    assert torch.all(scales[0] == 1)          # zero scale guard
    x = torch.randn(16, 64)
    x[:, 5] *= 30
    w = torch.randn(16, 64)
    w[0, 0] = 12.0                             # an outlier stretches the range
    plain = find_params(w, QuantSpec(3, -1, True))
    clipped = find_params(w, QuantSpec(3, -1, True, clip_search=True))
    def err(sz):
        s, z = sz
        return ((torch.clamp(torch.round(w / s) + z, 0, 7) - z) * s - w).pow(2).sum()
    assert err(clipped) <= err(plain)


@pytest.mark.parametrize("kw", [dict(bits=1), dict(bits=9), dict(group_size=0), dict(group_size=12)])
def test_quant_spec_rejects(kw):
    with pytest.raises(TensorpressError):
        QuantSpec(**{"bits": 4, "group_size": 32, **kw}).validate(64)


def test_group_larger_than_layer_rejected():
    with pytest.raises(TensorpressError, match="cannot apply"):
        QuantSpec(4, 128).validate(64)
