"""ARMOR (2:4 core between block-diagonal wrappers), the compact 2:4 module, and the LOST-style
decomposition (docs: algorithms/sparse.md §4, §5.3, §7), checked against fp64 references written
independently of the implementation (explicit block-diagonal matrices, brute-force masks, SVD)."""
import itertools
import json
import math

import pytest
import torch
import torch.nn as nn

import tensorpress as tp
from conftest import make_tiny
from tensorpress.calib.collectors import LinearStats
from tensorpress.compress.apply import compress_model, plan
from tensorpress.compress.armor import _sparse_core_step, armor_factorise
from tensorpress.compress.base import LinearContext
from tensorpress.compress.lost import lost_split
from tensorpress.compress.sparsity import check_nm, nm_prune_mask
from tensorpress.errors import TensorpressError
from tensorpress.modeling import decoder_layers, target_linears
from tensorpress.nn.modules import FORMATS, LowRankLinear, LowRankSparseLinear, Sparse24Linear
from tensorpress.recipe import Recipe


def _compressor(method, **params):
    return Recipe.from_dict({"stages": [{"method": method, **params}]}).stages[0].compressor


def _ctx(W, X=None, bias=None):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias is not None:
            lin.bias.copy_(bias)
    st = LinearStats(W.shape[1])
    if X is not None:
        st.n_tokens, st.gram_sum = X.shape[0], X.double().T @ X.double()
    return LinearContext("layer", lin, lin, st)


def _problem(seed, out_f=32, in_f=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * torch.rand(1, in_f, generator=g) * 2   # unequal column norms
    h = torch.rand(in_f, generator=g, dtype=torch.float64) * 4 + 0.1
    return W, h


# --- fp64 references -----------------------------------------------------------------------------------

def _ref_normalise(W):
    W = W.double()
    c = torch.sqrt((W ** 2).sum(0)) + 1e-5
    r = torch.sqrt(((W / c) ** 2).sum(1)) + 1e-5
    return W / c / r[:, None], r, c


def _ref_nowag_keep(Wbar, h):
    """Brute force: per row and group of 4, keep the 2 largest h_j W̄_ij² (ties: higher index kept)."""
    keep = torch.zeros(Wbar.shape, dtype=torch.bool)
    for i in range(Wbar.shape[0]):
        for g0 in range(0, Wbar.shape[1], 4):
            cols = sorted(range(g0, g0 + 4), key=lambda j: (float(h[j] * Wbar[i, j] ** 2), j))
            keep[i, cols[2:]] = True
    return keep


def _ref_loss(W, h, W_hat):
    """NoWag proxy of an effective weight ``Ŵ`` in the original scale: errors divided by r_i c_j."""
    Wbar, r, c = _ref_normalise(W)
    E = (W.double() - W_hat.double()) / r[:, None] / c[None, :]
    return float((E ** 2 * h[None, :]).sum() / (Wbar ** 2 * h[None, :]).sum())


def _dense_blockdiag(blocks):
    return torch.block_diag(*blocks.double())


def _ref_effective(res):
    return _dense_blockdiag(res.armor_a) @ res.core.double() @ _dense_blockdiag(res.armor_b)


# --- ARMOR -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lr", [1e-4, 1.0])            # 1.0: Adam diverges, only best-iterate tracking saves L
def test_armor_loss_never_above_nowag(seed, lr):
    W, h = _problem(seed)
    Wbar, _, _ = _ref_normalise(W)
    keep0 = _ref_nowag_keep(Wbar, h)
    L0 = float((h[None, :] * Wbar ** 2)[~keep0].sum() / (h[None, :] * Wbar ** 2).sum())
    res = armor_factorise(W, h, block_size=16, iterations=120, lr=lr, seed=seed)
    assert res.loss_init == pytest.approx(L0, rel=1e-9)
    L = _ref_loss(W, h, _ref_effective(res))
    assert L == pytest.approx(res.loss, rel=1e-5)
    assert L <= L0 * (1 + 1e-6)
    if lr == 1e-4:
        assert L < 0.97 * L0                                   # and it does improve on NoWag-P
    else:
        assert res.history[-1] > 2 * L0                        # the last iterate is worse: tracking matters


@pytest.mark.parametrize("seed", range(2))
def test_armor_core_is_exactly_24_and_wrappers_are_blocks(seed):
    W, h = _problem(seed, 48, 96)
    res = armor_factorise(W, h, block_size=16, iterations=40, lr=1e-3, seed=seed)
    assert torch.equal(res.keep.reshape(48, -1, 4).sum(-1), torch.full((48, 24), 2))
    assert not bool(res.core[~res.keep].any())
    check_nm(res.core, 2, 4)
    assert res.armor_a.shape == (3, 16, 16) and res.armor_b.shape == (6, 16, 16)
    m = Sparse24Linear.from_dense(res.core, res.armor_a, res.armor_b)
    assert torch.equal(m.core_weight(), res.core)
    torch.testing.assert_close(m.base_weight().double(), _ref_effective(res), rtol=1e-5, atol=1e-6)


def test_armor_zero_iterations_is_nowag_pruning():
    W, h = _problem(7)
    Wbar, _, _ = _ref_normalise(W)
    keep = _ref_nowag_keep(Wbar, h)
    res = armor_factorise(W, h, block_size=16, iterations=0)
    assert torch.equal(res.keep, keep)
    assert torch.equal(res.armor_a / res.armor_a.diagonal(dim1=1, dim2=2)[:, :, None],
                       torch.eye(16).expand(2, 16, 16))             # identity wrappers (scaled by r)
    torch.testing.assert_close(_ref_effective(res), W.double() * keep, rtol=1e-6, atol=1e-7)
    # NoWag-P is Wanda divided by the column norm: with unequal column norms the masks differ.
    wanda_keep = ~nm_prune_mask(W.abs() * h.sqrt().float()[None, :], 2, 4)
    assert not torch.equal(wanda_keep, keep)


def test_armor_sparse_core_step_is_the_exact_group_optimum():
    """Each re-solved group beats every one of the 6 supports solved by brute-force least squares on the
    full (dense block-diagonal) loss, and the step's closed-form loss equals the true loss."""
    W, h = _problem(5)
    Wbar, _, _ = _ref_normalise(W)
    g = torch.Generator().manual_seed(9)
    A = torch.eye(16).repeat(2, 1, 1) + 0.2 * torch.randn(2, 16, 16, generator=g)
    B = torch.eye(16).repeat(4, 1, 1) + 0.2 * torch.randn(4, 16, 16, generator=g)
    keep = _ref_nowag_keep(Wbar, h)
    Wp = Wbar.float() + 0.1 * torch.randn(32, 64, generator=g)
    before = (Wp * keep).double()
    num = _sparse_core_step(Wbar.float(), h.float(), A, B, Wp, keep, torch.Generator().manual_seed(0))
    after = (Wp * keep).double()
    Af, Bf, sh = _dense_blockdiag(A), _dense_blockdiag(B), h.sqrt()[None, :]

    def loss(S):
        return float((((Wbar - Af @ S @ Bf) * sh) ** 2).sum())

    assert float(num) == pytest.approx(loss(after), rel=1e-5)
    assert loss(after) <= loss(before) * (1 + 1e-6)
    assert torch.equal(keep.reshape(32, -1, 4).sum(-1), torch.full((32, 16), 2))
    changed = (before != after).reshape(32, 16, 4).any(-1).nonzero().tolist()
    blocks = {(i // 16, (4 * gi) // 16) for i, gi in changed}
    assert len(changed) == len(blocks) >= 4                      # at most one group per (p, q) block
    for i, gi in changed:
        cols = list(range(4 * gi, 4 * gi + 4))
        S0 = after.clone()
        S0[i, cols] = 0
        target = ((Wbar - Af @ S0 @ Bf) * sh).flatten()
        best = math.inf
        for P in itertools.combinations(range(4), 2):
            X = torch.stack([(Af[:, i:i + 1] @ Bf[cols[j]:cols[j] + 1, :] * sh).flatten() for j in P], 1)
            sol = torch.linalg.lstsq(X, target[:, None]).solution
            best = min(best, float((X @ sol - target[:, None]).pow(2).sum()))
        assert loss(after) <= best * (1 + 1e-5) + 1e-9
        assert int(keep[i, cols].sum()) == 2


def test_armor_sparse_core_steps_alone_are_monotone():
    W, h = _problem(3)
    res = armor_factorise(W, h, block_size=32, iterations=60, lr=0.0, patience=1000)
    hist = [res.loss_init] + res.history
    assert all(b <= a * (1 + 1e-6) for a, b in zip(hist, hist[1:]))


# --- the compact 2:4 module --------------------------------------------------------------------------

def _random_24(seed, out_f=32, in_f=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    return W.masked_fill(nm_prune_mask(torch.rand(out_f, in_f, generator=g), 2, 4), 0)


def test_sparse24_pack_round_trip_is_exact():
    W = _random_24(0)
    W[0, :4] = 0                                           # a group with fewer than 2 non-zeros
    W[1, 4:8] = torch.tensor([0.0, 1.5, 0.0, 0.0])
    m = Sparse24Linear.from_dense(W, bias=torch.randn(32))
    assert m.values.shape == (32, 32) and m.meta.dtype == torch.int32 and m.meta.shape == (32, 2)
    assert torch.equal(m.core_weight(), W) and torch.equal(m.effective_weight(), W)
    bad = W.clone()
    bad[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(TensorpressError, match=r"^lyr: cannot store as sparse24: weight is not 2:4: row 5, group 2") as e:
        Sparse24Linear.from_dense(bad, name="lyr")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("wrapped", [False, True])
def test_sparse24_forward_matches_effective_weight(wrapped):
    g = torch.Generator().manual_seed(2)
    W = _random_24(1)
    A = torch.randn(2, 16, 16, generator=g) if wrapped else None
    B = torch.randn(4, 16, 16, generator=g) if wrapped else None
    bias = torch.randn(32, generator=g)
    m = Sparse24Linear.from_dense(W, A, B, bias)
    m.set_correction(torch.randn(3, 64, generator=g), torch.randn(32, 3, generator=g), dtype=torch.float32)
    x = torch.randn(5, 7, 64, generator=g)
    ref = x.double() @ m.effective_weight().double().T + bias.double()
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-4)
    if wrapped:
        dense = _dense_blockdiag(A) @ W.double() @ _dense_blockdiag(B)
        torch.testing.assert_close(m.base_weight().double(), dense, rtol=1e-5, atol=1e-5)
    cfg = json.loads(json.dumps(m.config()))
    assert FORMATS[cfg["format"]] is Sparse24Linear and cfg["block_size"] == (16 if wrapped else 0)


# --- LOST-style ------------------------------------------------------------------------------------------

def _loud_columns(seed, out_f=48, in_f=80, n_loud=16):
    """Rank-4 signal + noise + ``n_loud`` large independent input columns; returns (W, loud indices)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, 4, generator=g, dtype=torch.float64) @ torch.randn(4, in_f, generator=g, dtype=torch.float64)
    W += 0.3 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    loud = torch.randperm(in_f, generator=g)[:n_loud]
    W[:, loud] += 5 * torch.randn(out_f, n_loud, generator=g, dtype=torch.float64)
    return W.float(), set(loud.tolist())


def test_lost_zero_channels_is_truncated_svd():
    W, _ = _loud_columns(0)
    lost = _compressor("lost", ratio=0.5, rho=0.0).compress(_ctx(W))
    svd = _compressor("svd", ratio=0.5).compress(_ctx(W))
    assert isinstance(lost, LowRankSparseLinear) and lost.n_channels == 0
    r = lost.factor_rank
    assert r == svd.factor_rank == math.floor(0.5 * 48 * 80 / 128)
    torch.testing.assert_close(lost.effective_weight(), svd.effective_weight(), rtol=0, atol=1e-5)
    sig = torch.linalg.svdvals(W.double())
    err = float(((W.double() - lost.effective_weight().double()) ** 2).sum())
    assert err == pytest.approx(float((sig[r:] ** 2).sum()), rel=1e-5)          # Eckart–Young


def test_lost_beats_svd_at_the_same_parameter_count():
    W, loud = _loud_columns(1)
    out_f, in_f = W.shape
    lost = _compressor("lost", ratio=0.5, rho=0.2).compress(_ctx(W))
    svd = _compressor("svd", ratio=0.5).compress(_ctx(W))
    k, r = lost.n_channels, lost.factor_rank
    assert (r, k) == lost_split(out_f, in_f, 0.5, 0.2) == (r, 16)
    chosen = lost.channels.tolist()
    assert chosen == sorted(set(chosen)) and len(set(chosen) & loud) >= 14
    params_lost = r * (out_f + in_f) + k * (out_f + 1)
    assert params_lost <= 0.5 * out_f * in_f and svd.factor_rank * (out_f + in_f) <= 0.5 * out_f * in_f
    e_lost = torch.linalg.norm(W.double() - lost.effective_weight().double())
    e_svd = torch.linalg.norm(W.double() - svd.effective_weight().double())
    assert e_lost < 0.9 * e_svd
    # Residual init reproduces the kept columns exactly (up to fp32 storage), and the error identity holds.
    idx = lost.channels.long()
    torch.testing.assert_close(lost.effective_weight()[:, idx], W[:, idx], rtol=0, atol=1e-4)
    x = torch.randn(4, in_f)
    torch.testing.assert_close(lost(x).double(), x.double() @ lost.effective_weight().double().T, rtol=1e-5, atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,match", [
    ({"method": "armor", "block_size": 24}, r"armor block_size 24 does not divide"),
    ({"method": "armor", "block_size": 6}, r"multiple of 4"),
    ({"method": "armor", "pattern": "4:8"}, r"armor supports only the 2:4 pattern"),
    ({"method": "wanda", "pattern": "4:8", "storage": "compact"}, r"storage 'compact' needs the 2:4 pattern"),
    ({"method": "sparsegpt", "sparsity": 0.5, "storage": "compact"}, r"storage 'compact' needs the 2:4 pattern"),
    ({"method": "wanda", "pattern": "2:4", "storage": "sparse"}, r"storage must be"),
    ({"method": "lost", "ratio": 1.5}, r"ratio must be <= 1"),
    ({"method": "lost", "ratio": 0}, r"ratio must be > 0"),
    ({"method": "lost", "ratio": 0.5, "rank": 4}, r"exactly one of"),
    ({"method": "lost", "ratio": 0.5, "rho": 1.2}, r"rho must be <= 1"),
    ({"method": "lost", "ratio": 0.05, "rho": 0.5}, r"cannot hold rank 1"),
])
def test_bad_input_is_one_line_error_before_work(stage, match):
    model = make_tiny("llama")                              # hidden 64, intermediate 96
    with pytest.raises(TensorpressError, match=match) as e:
        plan(model, Recipe.from_dict({"stages": [stage]}))
    assert "\n" not in str(e.value)


def test_shipped_recipes():
    a = Recipe.load("armor-2of4").stages[0].compressor.params
    assert (a.block_size, a.iterations, a.lr) == (32, 300, 3e-3)
    p = Recipe.load("armor-2of4-paper").stages[0].compressor.params
    assert (p.block_size, p.iterations, p.lr) == (128, 20000, 1e-4)
    assert [Recipe.load(n).stages[0].compressor.params.ratio for n in ("lost-p50", "lost-p80")] == [0.5, 0.8]


# --- whole models ----------------------------------------------------------------------------------------

STAGES = {
    "armor": ({"method": "armor", "block_size": 16, "iterations": 10}, Sparse24Linear),
    "lost": ({"method": "lost", "ratio": 0.5, "rho": 0.1, "score": "act_l2"}, LowRankSparseLinear),
    "wanda-compact": ({"method": "wanda", "pattern": "2:4", "storage": "compact"}, Sparse24Linear),
}


@pytest.mark.parametrize("method", list(STAGES))
def test_every_family_end_to_end_with_save_load(family, tokens, method, tmp_path):
    stage, cls = STAGES[method]
    model = make_tiny(family)
    recipe = Recipe.from_dict({"stages": [stage], "calibration": {"stats_source": "dense"}})
    records = compress_model(model, recipe, tokens, progress=False)
    lins = {f"{i}.{n}": m for i, layer in enumerate(decoder_layers(model)) for n, m in target_linears(layer).items()}
    assert len(records) == len(lins) and all(type(m) is cls for m in lins.values())
    assert all(math.isfinite(r.rel_error) and r.rel_error < 1 for r in records)
    for name, m in lins.items():
        if cls is Sparse24Linear:
            check_nm(m.core_weight(), 2, 4, name)
            assert (m.armor_a is not None) == (method == "armor")
    with torch.no_grad():
        ref = model(tokens).logits
    assert torch.isfinite(ref).all()
    path = tp.save(model, tmp_path / "ckpt", recipe=recipe)
    fmts = {v["format"] for v in json.loads((path / "config.json").read_text())["quantization_config"]["modules"].values()}
    assert fmts == {cls.FORMAT}
    loaded = tp.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, ref)
    assert isinstance(next(m for m in loaded.modules() if isinstance(m, cls)), LowRankLinear if method == "lost" else cls)
