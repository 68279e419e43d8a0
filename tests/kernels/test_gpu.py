"""GPU tier: compiled kernels vs the reference at real shapes (``pytest -m gpu`` on a CUDA machine)."""
import pytest
import torch

from tensorpress.kernels import ops, reference
from tensorpress.kernels.testing import random_24, random_w4, rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def f32(d):
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v
            for k, v in d.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 200])
@pytest.mark.parametrize("group,act,rank", [(128, False, 32), (64, True, 16), (-1, False, 0)])
def test_quant_linear(cuda, m, dtype, group, act, rank):
    L = random_w4(1536, 1024, group, sym=not act, act_order=act, rank=rank, bias=True, dtype=dtype, device=cuda)
    x = torch.randn(m, 1024, device=cuda, dtype=dtype)
    assert rel_err(ops.quant_linear(x, **L), reference.quant_linear(x.float(), **f32(L))) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 64, 300])
def test_w4a8_and_lowrank(cuda, m, dtype):
    L = random_w4(1024, 2048, 128, sym=False, rank=32, bias=True, dtype=dtype, device=cuda)
    L.pop("bits")
    x = torch.randn(m, 2048, device=cuda, dtype=dtype)
    sm = torch.rand(2048, device=cuda) + 0.5
    y = ops.w4a8_linear(x, **L, smooth=sm, act_group_size=64)
    assert rel_err(y, reference.w4a8_linear(x.float(), **f32(L), smooth=sm, act_group_size=64)) < TOL[dtype]
    y = ops.lowrank_linear(x, L["lr_down"], L["lr_up"], L["bias"])
    ref = reference.lowrank_linear(x.float(), L["lr_down"].float(), L["lr_up"].float(), L["bias"].float())
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,armor", [(1, 0), (4, 64), (8, 128), (64, 0), (64, 64)])
def test_sparse24(cuda, m, armor, dtype):
    S = random_24(1024, 2048, armor=armor, bias=True, dtype=dtype, device=cuda)
    x = torch.randn(m, 2048, device=cuda, dtype=dtype)
    try:
        y = ops.sparse24_linear(x, **S)
    except (RuntimeError, NotImplementedError) as e:           # semi-structured support varies by build
        pytest.skip(f"PyTorch semi-structured sparse unavailable: {e}")
    assert rel_err(y, reference.sparse24_linear(x.float(), **f32(S))) < TOL[dtype]


def test_cuda_graph_capture(cuda):
    L = random_w4(1024, 1024, 128, rank=32, bias=True, dtype=torch.bfloat16, device=cuda)
    x = torch.randn(1, 1024, device=cuda, dtype=torch.bfloat16)
    y0 = ops.quant_linear(x, **L)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ops.quant_linear(x, **L)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, reference.quant_linear(x.float(), **f32(L))) < TOL[torch.bfloat16]
    assert not torch.equal(y, y0)


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (1, 14336, 4096), (16, 4096, 1024)])
def test_split_k_serial_reduction_deterministic(cuda, m, k, n):
    """Decode shapes split K many ways; the in-kernel serial reduction sums the partials in split
    order, so repeated calls are bitwise identical, and its arrival counters end up zeroed."""
    from tensorpress.kernels import _tl
    L = random_w4(n, k, 128, rank=32, bias=True, dtype=torch.bfloat16, device=cuda)
    x = torch.randn(m, k, device=cuda, dtype=torch.bfloat16)
    ys = [ops.quant_linear(x, **L) for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert rel_err(ys[0], reference.quant_linear(x.float(), **f32(L))) < TOL[torch.bfloat16]
    assert all(not b.any() for b in _tl._LOCKS.values())


def test_lowrank_fused_graph_capture(cuda):
    down = torch.randn(512, 4096, device=cuda, dtype=torch.bfloat16) / 64
    up = torch.randn(4096, 512, device=cuda, dtype=torch.bfloat16) / 20
    x = torch.randn(1, 4096, device=cuda, dtype=torch.bfloat16)
    ops.lowrank_linear(x, down, up)                            # warm-up: compiles, allocates counters
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ops.lowrank_linear(x, down, up)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        ref = reference.lowrank_linear(x.float(), down.float(), up.float())
        assert rel_err(y, ref) < TOL[torch.bfloat16]
