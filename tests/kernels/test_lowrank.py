"""Low-rank kernels (down: fp32 K-split partials; up: + bias) under the interpreter."""
import pytest
import torch

from tensorpress.kernels import ops, reference
from tensorpress.kernels.testing import poisoned, rel_err

pytest.importorskip("triton")

TOL = {torch.float16: 3e-3, torch.float32: 2e-5}


@pytest.mark.parametrize("m,n,k,r,bias,dtype", [
    (1, 130, 200, 16, True, torch.float16),
    (5, 96, 256, 32, False, torch.float32),
    (40, 72, 100, 100, True, torch.float32),     # rank not a power of two: BLOCK_R loop with a tail
    (17, 64, 64, 24, True, torch.float16),
])
def test_lowrank_linear_matches_reference(interpret, m, n, k, r, bias, dtype):
    g = torch.Generator().manual_seed(m * r)
    x = torch.randn(m, k, generator=g).to(dtype)
    down = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    up = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    y = ops.lowrank_linear(x, down, up, b)
    ref = reference.lowrank_linear(x.double(), down.double(), up.double(), None if b is None else b.double())
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]


def test_down_and_up_poisoned(interpret):
    from tensorpress.kernels import lowrank
    m, n, k, r = 3, 70, 130, 40
    x = poisoned((m, k), torch.float32).copy_(torch.randn(m, k))
    down = poisoned((r, k), torch.float32).copy_(torch.randn(r, k))
    up = poisoned((n, r), torch.float32).copy_(torch.randn(n, r))
    t = lowrank.down(x, down, cfg=dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=32, SPLIT_K=2))
    assert t.shape == (2, m, r)
    assert rel_err(t.sum(0), x.double() @ down.double().t()) < 1e-6
    launch = lowrank.up_launch(t, up, None, torch.float32, cfg=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=16))
    y = poisoned((m, n), torch.float32)
    launch.args.update(y_ptr=y, stride_ym=y.stride(0))
    launch()
    assert rel_err(y, (x.double() @ down.double().t()) @ up.double().t()) < 1e-6
    assert torch.isnan(y._base[:, :4]).all() and torch.isnan(y._base[:, 4 + n:]).all()


def test_down_partials_poisoned(interpret):
    """The fp32 K-split partials ``t [SPLITS, M, R]``: every element written (a NaN-filled buffer
    comes back finite), rank tail and M tail included."""
    from tensorpress.kernels import lowrank
    m, k, r = 20, 200, 40
    x, down = torch.randn(m, k), torch.randn(r, k)
    launch = lowrank.down_launch(x, down, cfg=dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=64, SPLIT_K=2))
    t = torch.full_like(launch.outputs[0], float("nan"))
    launch.args["t_ptr"] = t
    launch()
    assert rel_err(t.sum(0), x.double() @ down.double().t()) < 1e-6
