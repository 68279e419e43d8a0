"""The low-rank family: FWSVD, ASVD, EoRA (and the plain-SVD correction), rank budgets, the batched
per-sequence Fisher — the checkable properties of docs/algorithms/lowrank-quant.md §3–§5, on random
matrices (fp64 references) and through the pipeline on tiny models of every family."""
import pytest
import torch

import tensorpress as tp
from conftest import make_tiny
from tensorpress.calib.collectors import LinearStats, collect_fisher
from tensorpress.compress.apply import compress_model, output_error
from tensorpress.compress.base import LinearContext
from tensorpress.compress.budget import LayerShape
from tensorpress.compress.eora import EoRA, SVDCorrection
from tensorpress.compress.lowrank import gram_sqrt, scaled_lowrank, truncated_svd, whitened_lowrank
from tensorpress.compress.svd import ASVD, FWSVD, SVD, SVDLLM
from tensorpress.errors import TensorpressError
from tensorpress.nn import DenseLinear, LowRankLinear, QuantLinear
from tensorpress.recipe import Recipe


def _data(seed=0, out_f=40, in_f=56, n=300):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    M = 0.4 * torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5 + torch.eye(in_f, dtype=torch.float64)
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ M
    X[:, [3, 11]] *= 25                                   # outlier channels
    return W, X


def _ctx(W, X=None, fisher=None, current=None, name="layer"):
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch.float64)
    lin.weight.data.copy_(W)
    st = LinearStats(W.shape[1])
    if X is not None:
        st.gram_sum, st.n_tokens = X.T @ X, X.shape[0]
        st.abs_sum, st.abs_max = X.abs().sum(0), X.abs().amax(0).float()
    if fisher is not None:
        st.fisher_in, st.fisher_out = fisher.sum(0), fisher.sum(1)
    return LinearContext(name, lin, current if current is not None else lin, st)


def _prod(m):
    return m.effective_weight().double()


def _out_err(W, W_hat, X):
    return float(torch.linalg.norm(X @ (W - W_hat).T))


# --- FWSVD -------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", ["in", "out"])
def test_fwsvd_uniform_fisher_is_plain_svd(axis):
    W, _ = _data()
    F = torch.full_like(W, 3.7e-9)
    fw = FWSVD(rank=9, fisher_axis=axis).compress(_ctx(W, fisher=F))
    sv = SVD(rank=9).compress(_ctx(W))
    assert torch.allclose(_prod(fw), _prod(sv), atol=1e-6 * float(W.abs().max()))


@pytest.mark.parametrize("axis", ["in", "out"])
def test_fwsvd_minimises_weighted_not_plain_error(axis):
    W, _ = _data(1)
    g = torch.Generator().manual_seed(5)
    F = torch.rand(W.shape, generator=g, dtype=torch.float64) ** 4 * 1e-6    # very uneven importance
    fw = _prod(FWSVD(rank=8, fisher_axis=axis).compress(_ctx(W, fisher=F)))
    sv = _prod(SVD(rank=8).compress(_ctx(W)))
    if axis == "in":
        D = F.sum(0).sqrt()
        werr = lambda Wh: float(torch.linalg.norm((W - Wh) * D[None, :]))   # noqa: E731
    else:
        D = F.sum(1).sqrt()
        werr = lambda Wh: float(torch.linalg.norm((W - Wh) * D[:, None]))   # noqa: E731
    assert werr(fw) < werr(sv)
    assert float(torch.linalg.norm(W - fw)) >= float(torch.linalg.norm(W - sv)) * (1 - 1e-9)
    # scale invariance of F and exact reconstruction at full rank
    fw2 = _prod(FWSVD(rank=8, fisher_axis=axis).compress(_ctx(W, fisher=F * 1e7)))
    assert torch.allclose(fw, fw2, atol=1e-5)
    full = _prod(FWSVD(rank=min(W.shape), fisher_axis=axis).compress(_ctx(W, fisher=F)))
    assert torch.allclose(full, W, atol=1e-5)


def test_fwsvd_in_equals_asvd_with_sqrt_fisher_scales():
    W, _ = _data(2)
    F = torch.rand(W.shape, dtype=torch.float64) + 0.1
    d = F.sum(0).sqrt()
    down, up = scaled_lowrank(W, 7, col_scale=d + 1e-6 * d.mean(), dtype=torch.float64)
    fw = _prod(FWSVD(rank=7).compress(_ctx(W, fisher=F)))
    assert torch.allclose(fw, up @ down, atol=1e-5)


def test_fwsvd_zero_fisher_columns_stay_finite():
    W, _ = _data(3)
    F = torch.rand(W.shape, dtype=torch.float64)
    F[:, :5] = 0
    m = FWSVD(rank=6).compress(_ctx(W, fisher=F))
    assert torch.isfinite(_prod(m)).all()


# --- ASVD --------------------------------------------------------------------------------------

def test_asvd_alpha_zero_is_plain_svd_and_full_rank_exact():
    W, X = _data(4)
    a0 = _prod(ASVD(rank=10, alpha=0.0).compress(_ctx(W, X)))
    sv = _prod(SVD(rank=10).compress(_ctx(W, X)))
    assert torch.allclose(a0, sv, atol=1e-6)
    full = _prod(ASVD(rank=min(W.shape)).compress(_ctx(W, X)))
    assert torch.allclose(full, W, atol=1e-6)


def test_asvd_scale_invariance_and_beats_plain_svd_on_outliers():
    W, X = _data(5)
    a = _prod(ASVD(rank=10, alpha=0.5).compress(_ctx(W, X)))
    b = _prod(ASVD(rank=10, alpha=0.5).compress(_ctx(W, X * 100)))
    assert torch.allclose(a, b, atol=1e-3)            # only through the +1e-6
    sv = _prod(SVD(rank=10).compress(_ctx(W, X)))
    assert _out_err(W, a, X) < _out_err(W, sv, X)
    # SVD-LLM is output-optimal: never worse than ASVD or plain SVD at the same rank
    sl = _prod(SVDLLM(rank=10).compress(_ctx(W, X)))
    assert _out_err(W, sl, X) <= min(_out_err(W, a, X), _out_err(W, sv, X)) * (1 + 1e-6)


# --- EoRA --------------------------------------------------------------------------------------

def _rtn_base(W, bits=3):
    from tensorpress.compress.quantizer import QuantSpec, quantize_groups
    codes, scales, zeros = quantize_groups(W.float(), QuantSpec(bits, 8, True, False).validate())
    return QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=8, sym=True, dtype=torch.float64)


def _pruned_base(W, keep=0.5):
    Wp = W.clone()
    k = int(W.shape[1] * (1 - keep))
    idx = W.abs().argsort(1)[:, :k]
    Wp.scatter_(1, idx, 0.0)
    m = DenseLinear(W.shape[1], W.shape[0], False, dtype=torch.float64)
    m.weight.data.copy_(Wp)
    return m


@pytest.mark.parametrize("base", ["rtn3", "pruned50", "pruned24"])
def test_eora_full_rank_reproduces_layer_and_tail_energy(base):
    W, X = _data(6)
    if base == "rtn3":
        b = _rtn_base(W)
    elif base == "pruned50":
        b = _pruned_base(W)
    else:
        Wp = W.clone().view(W.shape[0], -1, 4)
        idx = Wp.abs().argsort(-1)[..., :2]
        Wp.scatter_(-1, idx, 0.0)
        b = DenseLinear(W.shape[1], W.shape[0], False, dtype=torch.float64)
        b.weight.data.copy_(Wp.view_as(W))
    dW = W - _prod(b)
    full = EoRA(rank=min(W.shape), factor_dtype="model").compress(_ctx(W, X, current=b))
    assert torch.allclose(_prod(full), W, atol=1e-5)
    # off-calibration inputs too (H is positive definite here)
    Z = torch.randn(7, W.shape[1], dtype=torch.float64)
    assert torch.allclose(full(Z), Z @ W.T, atol=1e-7)
    for r in (4, 16):
        b2 = _rtn_base(W) if base == "rtn3" else type(b).from_config(b.config(), torch.float64)
        if base != "rtn3":
            b2.weight.data.copy_(b.weight)
        m = EoRA(rank=r, factor_dtype="model").compress(_ctx(W, X, current=b2))
        S, _ = gram_sqrt(X.T @ X / X.shape[0])
        tail = float((torch.linalg.svdvals(dW @ S)[r:] ** 2).sum())
        err2 = float(torch.linalg.norm(X @ (W - _prod(m)).T) ** 2) / X.shape[0]
        assert err2 == pytest.approx(tail, rel=1e-4)


def test_eora_beats_plain_svd_correction_and_is_monotone_in_rank():
    W, X = _data(7)
    errs = []
    for r in (2, 8, 24):
        e = _prod(EoRA(rank=r, factor_dtype="model").compress(_ctx(W, X, current=_rtn_base(W))))
        s = _prod(SVDCorrection(rank=r, factor_dtype="model").compress(_ctx(W, X, current=_rtn_base(W))))
        assert _out_err(W, e, X) < _out_err(W, s, X)
        errs.append(_out_err(W, e, X))
    assert errs == sorted(errs, reverse=True)
    # plain SVD correction = Eckart–Young on ΔW
    b = _rtn_base(W)
    dW = W - _prod(b)
    s = _prod(SVDCorrection(rank=5, factor_dtype="model").compress(_ctx(W, X, current=b)))
    d, u = truncated_svd(dW, 5, dtype=torch.float64)
    assert torch.allclose(s - _prod(_rtn_base(W)), u @ d, atol=1e-5)


def test_eora_identity_gram_is_svd_and_zero_error_gives_zero_factors():
    W, X = _data(8)
    Xw = torch.randn(4000, W.shape[1], dtype=torch.float64)
    Xw = torch.linalg.qr(Xw)[0] * (4000 ** 0.5)                # XᵀX/N = I exactly
    e = _prod(EoRA(rank=6, factor_dtype="model").compress(_ctx(W, Xw, current=_rtn_base(W))))
    s = _prod(SVDCorrection(rank=6, factor_dtype="model").compress(_ctx(W, Xw, current=_rtn_base(W))))
    assert torch.allclose(e, s, atol=1e-5)
    Wf = W.float().double()                     # what the dense base holds, exactly
    exact = DenseLinear(W.shape[1], W.shape[0], False, dtype=torch.float64)
    exact.weight.data.copy_(Wf)
    m = EoRA(rank=4, factor_dtype="model").compress(_ctx(Wf, X, current=exact))
    assert float(m.lr_up.abs().max()) == 0 or float((m.lr_up @ m.lr_down).abs().max()) < 1e-12


def test_eora_rank_deficient_gram_is_finite_and_avoids_null_space():
    W, _ = _data(9)
    X = torch.randn(12, W.shape[1], dtype=torch.float64)      # N < in: rank-deficient Gram
    m = EoRA(rank=10, factor_dtype="model").compress(_ctx(W, X, current=_rtn_base(W)))
    assert torch.isfinite(m.lr_down).all() and torch.isfinite(m.lr_up).all()
    # the down factor lives in the row space of X (no component in the null space of H)
    P = torch.linalg.pinv(X) @ X
    assert torch.allclose(m.lr_down.double() @ P, m.lr_down.double(), atol=1e-8)


def test_eora_stacks_and_stores_fp16_factors():
    W, X = _data(10)
    b = _rtn_base(W)
    m = EoRA(rank=4).compress(_ctx(W, X, current=b))
    assert m.lr_down.dtype == torch.float16 and m.rank == 4
    e1 = _out_err(W, _prod(m), X)
    m = EoRA(rank=4).compress(_ctx(W, X, current=m))          # a second stage fits the remaining error
    assert m.rank == 8 and _out_err(W, _prod(m), X) < e1
    assert m.config()["lr_dtype"] == "float16"


def test_correction_errors():
    W, X = _data(11)
    with pytest.raises(TensorpressError, match="compressed base"):
        EoRA(rank=4).compress(_ctx(W, X))
    with pytest.raises(TensorpressError, match="above min"):
        EoRA(rank=41).check_layer(_ctx(W, X))
    with pytest.raises(TensorpressError, match="exactly one"):
        EoRA()
    with pytest.raises(TensorpressError, match="space"):
        EoRA(rank=3, space="fourier")
    with pytest.raises(TensorpressError, match="factor_dtype"):
        EoRA(rank=3, factor_dtype="int8")
    with pytest.raises(TensorpressError, match="has no compressed base"):
        Recipe.from_dict({"stages": [{"method": "eora", "rank": 4}]}).stages_for("model.layers.0.mlp.up_proj")


# --- budgets -----------------------------------------------------------------------------------

def test_uniform_budget_equals_ratio_and_sensitivity_meets_budget():
    shapes = [LayerShape("a", 64, 48, 32), LayerShape("b", 96, 48, 32), LayerShape("c", 48, 48, 32)]
    st = SVD(budget={"params": 0.6})
    ranks = st.allocate(shapes)
    from tensorpress.compress.lowrank import rank_from_ratio
    assert ranks == {l.name: rank_from_ratio(l.out_features, l.in_features, 0.6) for l in shapes}
    g = torch.Generator().manual_seed(0)
    spectra = {"a": torch.linspace(1, 0.01, 48) ** 8,                      # fast decay: needs little rank
               "b": torch.ones(48), "c": torch.rand(48, generator=g).sort(descending=True).values}
    sens = SVD(budget={"params": 0.6}, allocation="sensitivity").allocate(shapes, spectra)
    used = sum(sens[l.name] * (l.out_features + l.in_features) for l in shapes)
    budget = sum(0.6 * l.out_features * l.in_features for l in shapes)
    assert used <= budget and budget - used < max(l.out_features + l.in_features for l in shapes)
    assert sens["a"] < ranks["a"]                     # the fast-decaying layer needs less rank

    def loss(rs):
        return sum(float(spectra[n][r:].sum() / spectra[n].sum()) for n, r in rs.items())
    assert loss(sens) <= loss(ranks) + 1e-12
    # bits budgets: 16 bits/weight of fp32 factors = half the parameters
    half = SVD(budget={"bits_per_weight": 16}).allocate(shapes)
    assert half == {l.name: rank_from_ratio(l.out_features, l.in_features, 0.5) for l in shapes}


def test_budgets_that_cannot_be_met():
    shapes = [LayerShape("a", 64, 48, 32)]
    with pytest.raises(TensorpressError, match="cannot be met"):
        SVD(budget={"bits_per_weight": 40}).allocate(shapes)              # more than dense fp32
    with pytest.raises(TensorpressError, match="cannot be met"):
        SVD(budget={"params": 1e-4}, allocation="sensitivity").allocate(shapes, {"a": torch.ones(48)})
    with pytest.raises(TensorpressError, match="cannot be met"):
        EoRA(budget={"params": 3.0}).allocate(shapes)
    with pytest.raises(TensorpressError, match="one key"):
        SVD(budget={"params": 0.5, "bits_per_weight": 3})
    with pytest.raises(TensorpressError, match="needs a 'budget'"):
        SVD(ratio=0.5, allocation="sensitivity")
    with pytest.raises(TensorpressError, match="factorisations"):
        EoRA(budget={"params": 0.1}, allocation="sensitivity")


# --- Fisher collection -------------------------------------------------------------------------

def test_batched_fisher_equals_per_sequence_gradients(tokens):
    model = make_tiny("qwen2", layers=1).double()
    mods = {"q": model.model.layers[0].self_attn.q_proj, "down": model.model.layers[0].mlp.down_proj}
    got = collect_fisher(model, tokens[:4], mods, batch_size=3, progress=False)
    ref_in = {n: 0 for n in mods}
    ref_out = {n: 0 for n in mods}
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in mods.items():
        m.weight.requires_grad_(True)
    for ids in tokens[:4]:
        model.zero_grad()
        out = model(input_ids=ids[None], labels=ids[None])
        out.loss.backward()
        for n, m in mods.items():
            G2 = m.weight.grad.double() ** 2
            ref_in[n] = ref_in[n] + G2.sum(0)
            ref_out[n] = ref_out[n] + G2.sum(1)
            m.weight.grad = None
    for n in mods:
        assert torch.allclose(got[n].fisher_in, ref_in[n], rtol=1e-6, atol=1e-20)
        assert torch.allclose(got[n].fisher_out, ref_out[n], rtol=1e-6, atol=1e-20)
        assert got[n].n_tokens == 4


# --- through the pipeline ----------------------------------------------------------------------

def test_family_recipes_on_every_architecture(family, tokens, tmp_path):
    model = make_tiny(family)
    with torch.no_grad():
        ref = model(input_ids=tokens[:2]).logits
    recipe = Recipe.from_dict({"name": "mix", "stages": [
        {"method": "fwsvd", "ratio": 0.9, "targets": r"mlp\.(up|gate)_proj"},
        {"method": "asvd", "rank": 8, "targets": r"self_attn\.[qk]_proj"},
        {"method": "rtn", "bits": 4, "group_size": 32, "targets": r"(v_proj|o_proj|down_proj)"},
        {"method": "eora", "rank": 4, "targets": r"(v_proj|o_proj|down_proj)"},
    ]})
    records = compress_model(model, recipe, tokens, batch_size=4, progress=False)
    kinds = {r.name.rsplit(".", 1)[-1]: r.methods for r in records}
    assert kinds["up_proj"] == ["fwsvd"] and kinds["down_proj"] == ["rtn", "eora"]
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, LowRankLinear) and isinstance(layer.mlp.down_proj, QuantLinear)
    assert layer.mlp.down_proj.rank == 4
    with torch.no_grad():
        out = model(input_ids=tokens[:2]).logits
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 1.0
    tp.save(model, tmp_path / "ck")
    back = tp.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(input_ids=tokens[:2]).logits, out)


def test_eora_lowers_calibration_error_in_the_pipeline(tokens):
    errs = {}
    for name, stages in {"gptq": [{"method": "gptq", "bits": 3, "group_size": 32}],
                         "svdcorr": [{"method": "gptq", "bits": 3, "group_size": 32},
                                     {"method": "svd-correction", "rank": 8}],
                         "eora": [{"method": "gptq", "bits": 3, "group_size": 32}, {"method": "eora", "rank": 8}]}.items():
        model = make_tiny("llama", seed=3)
        recs = compress_model(model, Recipe.from_dict({"name": name, "stages": stages}), tokens, progress=False)
        errs[name] = sum(r.rel_error for r in recs)
    assert errs["eora"] < errs["svdcorr"] < errs["gptq"]


def test_sensitivity_budget_in_the_pipeline(tokens):
    model = make_tiny("llama", seed=4)
    recipe = Recipe.from_dict({"name": "b", "stages": [
        {"method": "svd-llm", "budget": {"params": 0.5}, "allocation": "sensitivity"}]})
    records = compress_model(model, recipe, tokens, progress=False)
    total = sum(r.module["factor_rank"] * (r.module["in_features"] + r.module["out_features"]) for r in records)
    dense = sum(r.module["in_features"] * r.module["out_features"] for r in records)
    assert total <= 0.5 * dense
    assert len({r.module["factor_rank"] for r in records}) > 1          # not uniform
    # measured sensitivity beats the uniform split on the objective it optimises
    m2 = make_tiny("llama", seed=4)
    uni = compress_model(m2, Recipe.from_dict({"name": "u", "stages": [{"method": "svd-llm", "ratio": 0.5}]}),
                         tokens, progress=False)
    assert sum(r.rel_error ** 2 for r in records) < sum(r.rel_error ** 2 for r in uni) * 1.05


def test_fwsvd_in_the_pipeline_matches_precomputed_fisher(tokens):
    recipe = Recipe.from_dict({"name": "f", "stages": [{"method": "fwsvd", "rank": 6, "targets": r"layers\.0\."}]})
    m1 = make_tiny("mistral", seed=2)
    r1 = compress_model(m1, recipe, tokens, progress=False)
    m2 = make_tiny("mistral", seed=2)
    mods = {f"model.layers.0.{n}": m for n, m in m2.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    fisher = collect_fisher(m2, tokens, mods, progress=False)
    r2 = compress_model(m2, recipe, tokens, progress=False, fisher=fisher)
    assert [a.rel_error for a in r1] == pytest.approx([b.rel_error for b in r2], rel=1e-5)
    with pytest.raises(TensorpressError, match="Fisher"):
        compress_model(make_tiny("mistral", seed=2), recipe, tokens, progress=False, fisher={})
