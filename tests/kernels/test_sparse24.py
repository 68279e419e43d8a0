"""2:4 gather-GEMV (+ fused ARMOR output wrapper) and the block-diagonal input kernel."""
import pytest
import torch

from tensorpress.kernels import ops, reference
from tensorpress.kernels.testing import poisoned, random_24, rel_err

pytest.importorskip("triton")


def oracle(x, S):
    d = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in S.items()}
    return reference.sparse24_linear(x.double(), **d)


@pytest.mark.parametrize("m,n,k,armor,bias,dtype", [
    (1, 100, 256, 0, True, torch.float16),       # N not a multiple of BLOCK_N
    (3, 128, 144, 0, False, torch.float32),      # K/2 not a multiple of BLOCK_J
    (1, 128, 256, 32, True, torch.float32),
    (2, 64, 128, 64, False, torch.float16),
    (4, 96, 96, 16, True, torch.float32),
])
def test_sparse24_linear_matches_reference(interpret, m, n, k, armor, bias, dtype):
    S = random_24(n, k, armor=armor, bias=bias, dtype=dtype, seed=m + armor)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    y = ops.sparse24_linear(x, **S)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, oracle(x, S)) < (3e-3 if dtype == torch.float16 else 2e-5)


@pytest.mark.parametrize("split,armor", [(1, 0), (3, 0), (2, 32)])
def test_gemv_launch_poisoned(interpret, split, armor):
    from tensorpress.kernels import sparse24
    m, n, k = 2, 96, 192
    S = random_24(n, k, armor=armor, bias=True, dtype=torch.float32, seed=split)
    x = poisoned((m, k), torch.float32).copy_(torch.randn(m, k))
    values = poisoned(S["values"].shape, torch.float32).copy_(S["values"])
    meta = poisoned(S["meta"].shape, torch.int32).copy_(S["meta"])
    h = sparse24._run(sparse24.blockdiag_launch(x, S["armor_b"]))[0] if armor else x
    launch = sparse24.gemv_launch(h, values, meta, S["bias"], S["armor_a"],
                                  cfg=dict(BLOCK_N=32, BLOCK_J=32, SPLIT_K=split))
    assert launch.consts["ATOMIC"] == (split > 1)
    y = poisoned((m, n), torch.float32)
    if split > 1:
        y.zero_()
    launch.args.update(y_ptr=y, stride_ym=y.stride(0))
    launch()
    assert rel_err(y, oracle(x, S)) < 2e-5
    assert torch.isnan(y._base[:, :4]).all() and torch.isnan(y._base[:, 4 + n:]).all()


def test_blockdiag_kernel(interpret):
    from tensorpress.kernels import sparse24
    x = torch.randn(5, 96).half()
    blocks = torch.randn(3, 32, 32).half()
    y = sparse24._run(sparse24.blockdiag_launch(x, blocks))[0]
    assert y.dtype == torch.float32
    assert rel_err(y, reference.blockdiag(x.double(), blocks.double())) < 1e-6


def test_non_power_of_two_armor_falls_back(interpret):
    S = random_24(48, 48, armor=24, dtype=torch.float32)
    x = torch.randn(2, 48)
    assert torch.equal(ops.sparse24_linear(x, **S), reference.sparse24_linear(x, **S))


def test_armor_shapes_validated():
    S = random_24(64, 64, armor=16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"armor_b \(3, 16, 16\) is not \[64/b, b, b\]"):
        ops.sparse24_linear(torch.randn(1, 64), **dict(S, armor_b=S["armor_b"][:3]))


def test_semi_structured_conversion_validates_first(monkeypatch):
    """``to_sparse_semi_structured`` silently drops extra non-zeros: the conversion refuses a
    weight that is not 2:4 before calling it, and passes a real 2:4 weight through unchanged."""
    from tensorpress import kernels
    from tensorpress.packing import unpack_24
    seen = []
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: seen.append(w.clone()) or "converted")
    S = random_24(64, 128, dtype=torch.float16)
    w = unpack_24(S["values"], S["meta"], 128)
    assert kernels.to_semi_structured(w) == "converted" and torch.equal(seen[0], w)
    bad = w.clone()
    bad[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])          # three non-zeros in group 2 of row 5
    with pytest.raises(ValueError, match="row 5, group 2"):
        kernels.to_semi_structured(bad)
    assert len(seen) == 1                                      # never reached the converter


def test_blockdiag_kernel_poisoned(interpret):
    """Every element of the fp32 output written, padding untouched, no read outside the blocks."""
    from tensorpress.kernels import sparse24
    x = poisoned((5, 96), torch.float32).copy_(torch.randn(5, 96))
    blocks = torch.randn(3, 32, 32)
    launch = sparse24.blockdiag_launch(x, blocks)
    y = poisoned((5, 96), torch.float32)
    launch.args.update(y_ptr=y, stride_ym=y.stride(0))
    launch()
    assert rel_err(y, reference.blockdiag(x.double(), blocks.double())) < 1e-6
    assert torch.isnan(y._base[:, :4]).all() and torch.isnan(y._base[:, 4 + 96:]).all()


def test_large_m_semi_structured_path(interpret, monkeypatch):
    """Large M goes through PyTorch semi-structured sparse (CUDA-only in PyTorch, so the conversion is
    stubbed with the dense matrix here): the validated conversion runs once per weight and again only
    after the weight changes in place; ARMOR wrappers and bias are applied around it."""
    from tensorpress.kernels import _env, configs, sparse24
    monkeypatch.setattr(_env, "fast_paths_allowed", lambda: True)
    monkeypatch.setattr(configs, "THRESHOLDS", dict(configs.THRESHOLDS, sparse_max_m=4))
    sp = _env.kernel_module("sparse24")
    monkeypatch.setattr(sp, "semi_structured_ok", lambda x, values, k: True)
    converted = []
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: converted.append(w) or w.clone())
    monkeypatch.setattr(sp, "gemv_launch", lambda *a, **k: pytest.fail("GEMV used above sparse_max_m"))
    S = random_24(64, 128, armor=32, bias=True, dtype=torch.float32, seed=7)
    x = torch.randn(9, 128)
    for _ in range(2):
        assert rel_err(ops.sparse24_linear(x, **S), oracle(x, S)) < 1e-5
    assert len(converted) == 1                                  # cached per weight tensor
    S["values"].mul_(2.0)                                       # in-place update: stale cache must not be used
    assert rel_err(ops.sparse24_linear(x, **S), oracle(x, S)) < 1e-5
    assert len(converted) == 2
    assert sparse24 is sp
