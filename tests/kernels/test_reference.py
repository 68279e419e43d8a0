"""The pure-PyTorch reference ops (the oracle): checked against independent dense constructions."""
import pytest
import torch

from tensorpress.kernels import reference
from tensorpress.kernels.testing import random_24, random_w4, rel_err
from tensorpress.packing import unpack_24


def test_quantize_activations_rounds_half_up_and_scales_per_group():
    # row max 127 → inverse scale exactly 1, so v·(127/a) + 0.5 hits the .5 ties exactly
    x = torch.tensor([[127.0, 2.5, -2.5, 0.49, -0.5, 3.0, -127.0, 1.5]])
    q, s = reference.quantize_activations(x)
    assert q.dtype == torch.int8 and s.shape == (1, 1) and float(s) == 1.0
    assert q.tolist() == [[127, 3, -2, 0, 0, 3, -127, 2]]          # floor(v + 0.5): ties go up
    q2, s2 = reference.quantize_activations(x, group_size=4)
    assert s2.shape == (1, 2) and torch.allclose(s2, torch.tensor([[1.0, 1.0]]))
    z, sz = reference.quantize_activations(torch.zeros(2, 8))       # all-zero rows stay finite
    assert torch.all(z == 0) and torch.all(torch.isfinite(sz))


@pytest.mark.parametrize("group", [-1, 16])
def test_quantize_activations_error_and_smoothing(group):
    x = torch.randn(5, 48) * 3
    smooth = torch.rand(48) + 0.5
    q, s = reference.quantize_activations(x, smooth, group)
    g = 48 if group == -1 else group
    deq = q.float() * s.repeat_interleave(g, 1)
    assert torch.all((deq - x / smooth).abs() <= s.repeat_interleave(g, 1) * 0.5 + 1e-6)
    assert int(q.abs().max()) == 127


def test_w4a8_reference_close_to_w4a16_reference():
    L = random_w4(24, 64, 32, rank=16, bias=True, dtype=torch.float32, sym=False)
    x = torch.randn(7, 64)
    y16 = reference.quant_linear(x, **L)
    L.pop("bits")
    y8 = reference.w4a8_linear(x, **L)
    assert 1e-5 < rel_err(y8, y16) < 2e-2                           # int8 activation error, nothing more
    # smoothing divides only what the 4-bit GEMM sees; the low-rank branch reads the raw x
    smooth = torch.rand(64) + 0.5
    ys = reference.w4a8_linear(x, **L, smooth=smooth)
    base = reference.quant_linear(x / smooth, **dict(L, bits=4, bias=None, lr_down=None, lr_up=None))
    expect = base + (x @ L["lr_down"].t()) @ L["lr_up"].t() + L["bias"]
    assert rel_err(ys, expect) < 2e-2 and rel_err(ys, y16) > 5e-2


def test_blockdiag_matches_torch_block_diag():
    blocks = torch.randn(3, 4, 4)
    x = torch.randn(2, 5, 12)
    dense = torch.block_diag(*blocks)
    assert torch.allclose(reference.blockdiag(x, blocks), x @ dense.t(), atol=1e-6)


def test_sparse24_reference_is_armor_sandwich():
    S = random_24(32, 64, armor=16, bias=True, dtype=torch.float32)
    x = torch.randn(3, 64)
    w = unpack_24(S["values"], S["meta"], 64)
    a, b = torch.block_diag(*S["armor_a"]), torch.block_diag(*S["armor_b"])
    expect = x @ (a @ w @ b).t() + S["bias"]
    assert torch.allclose(reference.sparse24_linear(x, **S), expect, atol=1e-5)
    plain = dict(S, armor_a=None, armor_b=None, bias=None)
    assert torch.allclose(reference.sparse24_linear(x, **plain), x @ w.t(), atol=1e-6)
