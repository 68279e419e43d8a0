"""GPTQ's checkable properties (docs: algorithms/lowrank-quant.md §1.5)."""
import pytest
import torch

from tensorpress.compress.gptq import gptq_quantize
from tensorpress.compress.quantizer import QuantSpec, quantize_groups
from tensorpress.errors import TensorpressError
from tensorpress.nn import QuantLinear


def _data(seed, out_f=48, in_f=128, n=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    M = 0.3 * torch.randn(in_f, in_f, generator=g, dtype=torch.float64) + torch.eye(in_f, dtype=torch.float64)
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ M
    X[:, :3] *= 20
    return W.float(), X, X.T @ X / n


def _deq(codes, scales, zeros, g_idx, spec):
    m = QuantLinear.from_codes(codes, scales, zeros, bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                               g_idx=g_idx)
    return m.base_weight().double()


def _out_err(W, W_hat, X):
    return float(torch.linalg.norm(X @ (W.double() - W_hat).T))


def test_diagonal_hessian_equals_rtn():
    W, _, _ = _data(0)
    spec = QuantSpec(4, 32, True)
    H = torch.eye(W.shape[1], dtype=torch.float64) * 3.0
    codes, scales, zeros, g_idx = gptq_quantize(W, H, spec, damp=0.01)
    rc, rs, rz = quantize_groups(W, spec)
    assert g_idx is None
    assert torch.equal(codes, rc) and torch.equal(scales, rs) and torch.equal(zeros, rz)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_calibration_error(sym):
    wins = 0
    for seed in range(5):
        W, X, H = _data(seed)
        spec = QuantSpec(3, 32, sym)
        c, s, z, gi = gptq_quantize(W, H, spec)
        rc, rs, rz = quantize_groups(W, spec)
        wins += _out_err(W, _deq(c, s, z, gi, spec), X) < _out_err(W, _deq(rc, rs, rz, None, spec), X)
    assert wins >= 4


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True), (False, True)])
def test_grid_and_g_idx(act_order, static):
    W, X, H = _data(3)
    spec = QuantSpec(4, 32, True)
    c, s, z, gi = gptq_quantize(W, H, spec, act_order=act_order, static_groups=static)
    in_f = W.shape[1]
    g_idx = gi.long() if gi is not None else torch.arange(in_f) // 32
    monotone = bool(torch.all(g_idx[1:] >= g_idx[:-1]))
    assert monotone == (not act_order or static)
    # every group holds exactly group_size columns, and each weight is on its group's grid
    assert torch.equal(torch.bincount(g_idx), torch.full((in_f // 32,), 32))
    W_hat = _deq(c, s, z, gi, spec)
    q = W_hat / s.double()[g_idx].T + z.double()[g_idx].T
    assert torch.allclose(q, q.round(), atol=1e-6)
    # act-order is a permutation of the work, not of the result's meaning: error stays small
    assert _out_err(W, W_hat, X) < 0.2 * float(torch.linalg.norm(X @ W.double().T))


def test_dead_columns_are_zero():
    W, X, H = _data(4)
    H[:, 5] = 0
    H[5, :] = 0
    c, s, z, gi = gptq_quantize(W, H, QuantSpec(4, 32, False))
    assert torch.all(_deq(c, s, z, gi, QuantSpec(4, 32, False))[:, 5] == 0)


def test_singular_hessian_is_damped_not_crashing():
    W, _, _ = _data(5)
    X = torch.randn(4, W.shape[1], dtype=torch.float64)     # N < in: rank-deficient Gram
    c, s, z, gi = gptq_quantize(W, X.T @ X / 4, QuantSpec(4, 32, True), damp=1e-6)
    assert torch.isfinite(s).all()


def test_nan_hessian_is_a_clear_error():
    W, _, H = _data(6)
    H[0, 0] = float("nan")
    with pytest.raises(TensorpressError, match="singular"):
        gptq_quantize(W, H, QuantSpec(4, 32, True))
