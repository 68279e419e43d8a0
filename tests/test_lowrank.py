"""SVD baselines: the checkable properties of SVD-LLM and plain SVD (docs §0.3, §0.4, §2.4, §8)."""
import pytest
import torch

from tensorpress.compress.lowrank import gram_sqrt, rank_from_ratio, truncated_svd, whitened_lowrank


def _data(seed=0, out_f=48, in_f=64, n=400):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    M = 0.3 * torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5 + torch.eye(in_f, dtype=torch.float64)
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ M
    X[:, [2, 7]] *= 30
    return W, X, X.T @ X / n


def _err2(W, down, up, X):
    return float(torch.linalg.norm(X @ (W - up.double() @ down.double()).T) ** 2 / X.shape[0])


def test_rank_from_ratio_convention():
    # ratio = fraction of parameters kept: r = floor(ρ·out·in/(out+in))
    assert rank_from_ratio(576, 576, 0.8) == int(0.8 * 576 * 576 / 1152)
    assert rank_from_ratio(1536, 576, 0.5) == int(0.5 * 1536 * 576 / 2112)
    r = rank_from_ratio(1536, 576, 0.8)
    assert r * (1536 + 576) <= 0.8 * 1536 * 576 < (r + 1) * (1536 + 576)


@pytest.mark.parametrize("rank", [4, 16, 40])
def test_svdllm_tail_energy_identity_and_optimality(rank):
    W, X, H = _data()
    down, up = whitened_lowrank(W, H, rank, dtype=torch.float64)
    S, _ = gram_sqrt(H)
    sig = torch.linalg.svdvals(W @ S)
    assert _err2(W, down, up, X) == pytest.approx(float((sig[rank:] ** 2).sum()), rel=1e-4)
    # optimal in output error: never worse than plain SVD at the same rank
    pd, pu = truncated_svd(W, rank, dtype=torch.float64)
    assert _err2(W, down, up, X) <= _err2(W, pd, pu, X) * (1 + 1e-6)


def test_square_root_independence():
    W, X, H = _data(1)
    a = whitened_lowrank(W, H, 12, sqrt="eigh", dtype=torch.float64)
    b = whitened_lowrank(W, H, 12, sqrt="cholesky", dtype=torch.float64)
    Ma, Mb = a[1].double() @ a[0].double(), b[1].double() @ b[0].double()
    assert torch.allclose(Ma, Mb, rtol=0, atol=1e-8 * float(Ma.abs().max()))


def test_full_rank_reproduces_and_scale_invariance():
    W, X, H = _data(2)
    down, up = whitened_lowrank(W, H, min(W.shape), dtype=torch.float64)
    assert torch.allclose(up @ down, W, atol=1e-8)
    d1, u1 = whitened_lowrank(W, H, 10)
    d2, u2 = whitened_lowrank(W, 1000.0 * H, 10)
    assert torch.allclose(u1 @ d1, u2 @ d2, atol=1e-4)


def test_uniform_gram_is_plain_svd_and_eckart_young():
    W, _, _ = _data(3)
    d, u = whitened_lowrank(W, torch.eye(W.shape[1], dtype=torch.float64) * 2.5, 9)
    pd, pu = truncated_svd(W, 9)
    assert torch.allclose(u @ d, pu @ pd, atol=1e-4)
    sig = torch.linalg.svdvals(W)
    assert float(torch.linalg.norm(W - (pu @ pd).double()) ** 2) == pytest.approx(float((sig[9:] ** 2).sum()), rel=1e-4)


def test_rank_deficient_gram_gives_finite_factors():
    W, _, _ = _data(4)
    X = torch.randn(10, W.shape[1], dtype=torch.float64)     # N < in
    down, up = whitened_lowrank(W, X.T @ X / 10, 8)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    down, up = whitened_lowrank(W, X.T @ X / 10, 8, sqrt="cholesky")
    assert torch.isfinite(down).all() and torch.isfinite(up).all()


@pytest.mark.parametrize("side", ["both", "up", "down"])
def test_sigma_side_keeps_product(side):
    W, _, _ = _data(5)
    d, u = truncated_svd(W, 6, side)
    d0, u0 = truncated_svd(W, 6, "both")
    assert torch.allclose(u @ d, u0 @ d0, atol=1e-5)
