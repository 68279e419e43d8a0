"""SVDQuant's smoothing vector folded into the preceding RMSNorm (``fold_smoothing``): folding leaves
the outputs unchanged on every family (Llama-style ``w · n(x)`` and Gemma's ``(1 + w) · n(x)`` norms),
only q/k/v and gate/up fold (o_proj / down_proj keep their vector), a partially compressed layer keeps
its vector, and the folded model survives a save/load round trip, the streaming runner and a dense
export."""
import json

import pytest
import torch

import tensorpress as tp
from conftest import make_tiny
from tensorpress.compress.apply import compress_model
from tensorpress.errors import TensorpressError
from tensorpress.modeling import NormReaders, norm_readers, scaled_norm_weight
from tensorpress.nn.modules import SVDQuantLinear
from tensorpress.recipe import Recipe

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
UNFOLDED = ("self_attn.o_proj", "mlp.down_proj")
# the norm before gate/up: Llama / Qwen2 / Mistral read post_attention_layernorm, Gemma 3 pre_feedforward
MLP_NORM = {"llama": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
            "mistral": "post_attention_layernorm", "gemma": "pre_feedforward_layernorm"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _stage(act_bits=16, **kw):
    return {"method": "svdquant", "rank": 8, "act_bits": act_bits, "group_size": 32, "alpha_grid": 3,
            "iterations": 4, **({"act_group_size": 32} if act_bits == 4 else {}), **kw}


def _recipe(stages, dense_stats=False):
    r = {"name": "sq-fold", "stages": stages if isinstance(stages, list) else [stages]}
    if dense_stats:
        r["calibration"] = {"stats_source": "dense"}
    return Recipe.from_dict(r)


def _tiny(family, layers=2):
    """A tiny model whose norms give a few channels ×30 (activation outliers, as real models have):
    the smoothing search then picks a non-trivial λ for q/k/v and gate/up, even for W4A16."""
    model = make_tiny(family, layers=layers)
    with torch.no_grad():
        for layer in model.model.layers:
            for name, mod in layer.named_modules():
                if name.endswith("layernorm") and hasattr(mod, "weight"):
                    w = mod.weight
                    if family == "gemma":
                        w[[3, 17, 40]] = 30 * (1 + w[[3, 17, 40]]) - 1
                    else:
                        w[[3, 17, 40]] *= 30
    return model


def _compressed(family, recipe, tokens, layers=2):
    model = _tiny(family, layers=layers)
    compress_model(model, recipe, tokens, progress=False)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _norm_mult(family, w):
    return (1 + w.double()) if family == "gemma" else w.double()


# --- 1. the docs' property: folding leaves outputs unchanged ---------------------------------------

@pytest.mark.parametrize("act_bits", [16, 4])
def test_fold_leaves_outputs_unchanged(tokens, family, act_bits):
    """Same recipe with fold on and off. Statistics from the dense stream, so that both runs compress
    exactly the same linears (with the compressed stream, block 1 is calibrated on block 0's outputs,
    which folding changes by fp rounding, and its quantised codes may then differ); fp32 factors, so
    that ``lr_down ⊙ λ`` is exact up to one fp32 rounding."""
    st = _stage(act_bits, factor_dtype="float32")
    off = _compressed(family, _recipe({**st, "fold_smoothing": False}, dense_stats=True), tokens)
    on = _compressed(family, _recipe({**st, "fold_smoothing": True}, dense_stats=True), tokens)
    dense = _tiny(family)
    smoothed_down = 0
    for i, (lo, ln, ld) in enumerate(zip(off.model.layers, on.model.layers, dense.model.layers)):
        for norm, readers in (("input_layernorm", QKV), (MLP_NORM[family], GATE_UP)):
            lam = lo.get_submodule(readers[0]).smooth
            assert not bool((lam == 1).all()), (i, norm)                 # something to fold (else vacuous)
            w0 = ld.get_submodule(norm).weight
            assert torch.equal(lo.get_submodule(norm).weight, w0)         # fold off: the norm is untouched
            w = ln.get_submodule(norm).weight
            assert not torch.equal(w, w0), (i, norm)
            # the norm now outputs x ⊘ λ: w / λ (Llama-style), (1 + w) / λ − 1 (Gemma)
            torch.testing.assert_close(_norm_mult(family, w), _norm_mult(family, w0) / lam.double(),
                                       rtol=1e-6, atol=1e-7)
            for n in readers:
                mo, mn = lo.get_submodule(n), ln.get_submodule(n)
                assert torch.equal(mo.smooth, lam)                        # one λ per norm
                assert type(mn) is SVDQuantLinear and bool((mn.smooth == 1).all()) and mn._smooth_arg() is None
                for t in ("qweight", "scales", "qzeros", "lr_up"):
                    assert torch.equal(getattr(mn, t), getattr(mo, t)), (i, n, t)
                torch.testing.assert_close(mn.lr_down, mo.lr_down * lam[None, :], rtol=1e-6, atol=0)
        for n in UNFOLDED:                                                # no norm before them: unchanged
            mo, mn = lo.get_submodule(n), ln.get_submodule(n)
            assert torch.equal(mn.smooth, mo.smooth) and torch.equal(mn.lr_down, mo.lr_down)
            smoothed_down += not bool((mo.smooth == 1).all())
    assert smoothed_down                                                  # o/down really kept a vector
    for n, p in on.named_parameters():                                    # nothing else moved
        if not any(k in n for k in ("layernorm", "lr_down")):
            assert torch.equal(p, off.get_parameter(n)), n

    # the folded norm's output is the unfolded module's smoothed input (no quantiser involved)
    h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    for lo, ln in zip(off.model.layers, on.model.layers):
        for norm, readers in (("input_layernorm", QKV), (MLP_NORM[family], GATE_UP)):
            want = lo.get_submodule(norm)(h) / lo.get_submodule(readers[0]).smooth
            torch.testing.assert_close(ln.get_submodule(norm)(h), want, rtol=2e-6, atol=1e-7)

    a, b = _logits(off, tokens), _logits(on, tokens)
    if act_bits == 16:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    else:
        # W4A4: an fp32 rounding of an activation at a rounding boundary of its 4-bit code flips the
        # code (about 1 element in 10^6), and the sequence's later positions diverge from there. Every
        # sequence without such a flip must be equal; almost all are.
        close = [bool(torch.allclose(b[s], a[s], rtol=1e-5, atol=1e-5)) for s in range(len(tokens))]
        assert sum(close) >= len(tokens) - 2, close


def test_fold_with_fp16_factors_is_one_rounding_of_the_branch(tokens):
    """Default ``factor_dtype: float16``: the folded branch is ``fp16(lr_down ⊙ λ)`` exactly, and the
    logits move by that rounding only (W4A16)."""
    st = _stage(16)
    off = _compressed("llama", _recipe({**st, "fold_smoothing": False}, dense_stats=True), tokens)
    on = _compressed("llama", _recipe(st, dense_stats=True), tokens)          # default: fold
    for lo, ln in zip(off.model.layers, on.model.layers):
        for n in QKV + GATE_UP:
            mo, mn = lo.get_submodule(n), ln.get_submodule(n)
            assert mn.lr_down.dtype == torch.float16
            assert torch.equal(mn.lr_down, (mo.lr_down.double() * mo.smooth.double()[None, :]).half())
    a, b = _logits(off, tokens), _logits(on, tokens)
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 1e-3, rel


def test_fold_happens_before_the_block_runs_for_the_next_inputs(tokens):
    """Compressed-stream statistics: block 0 runs forward (giving block 1 its calibration inputs) with
    its norms already folded, so the stored model is the one that was calibrated."""
    model = _tiny("llama")
    layer0 = model.model.layers[0]
    seen = []
    layer0.register_forward_pre_hook(
        lambda mod, args: seen.append((type(mod.self_attn.q_proj).__name__,
                                       getattr(mod.self_attn.q_proj, "smooth", torch.zeros(1)).eq(1).all().item(),
                                       mod.input_layernorm.weight.clone())))
    compress_model(model, _recipe(_stage(16)), tokens, batch_size=4, progress=False)
    # 2 batches of 4: capture and statistics pass (dense), then the pass for block 1's inputs
    assert [s[:2] for s in seen] == [("Linear", False)] * 4 + [("SVDQuantLinear", True)] * 2
    assert torch.equal(seen[-1][2], layer0.input_layernorm.weight)
    assert not torch.equal(seen[0][2], layer0.input_layernorm.weight)


# --- 2. partial layers keep their vector --------------------------------------------------------------

def test_partial_layer_keeps_its_vector(tokens):
    dense = _tiny("qwen2")
    model = _compressed("qwen2", _recipe({**_stage(16), "exclude": [r"k_proj"]}), tokens)
    for ld, layer in zip(dense.model.layers, model.model.layers):
        assert type(layer.self_attn.k_proj) is torch.nn.Linear
        assert torch.equal(layer.input_layernorm.weight, ld.input_layernorm.weight)     # k_proj reads it too
        q, v = layer.self_attn.q_proj, layer.self_attn.v_proj
        assert torch.equal(q.smooth, v.smooth) and not bool((q.smooth == 1).all())
        assert not torch.equal(layer.post_attention_layernorm.weight, ld.post_attention_layernorm.weight)
        assert all(bool((layer.get_submodule(n).smooth == 1).all()) for n in GATE_UP)

    # two stages: attention by one that does not fold, the MLP by one that does
    both = [{**_stage(16), "fold_smoothing": False, "targets": r"self_attn\."}, {**_stage(16), "targets": r"mlp\."}]
    model = _compressed("gemma", _recipe(both), tokens)
    dense = _tiny("gemma")
    for ld, layer in zip(dense.model.layers, model.model.layers):
        assert torch.equal(layer.input_layernorm.weight, ld.input_layernorm.weight)
        assert not bool((layer.self_attn.q_proj.smooth == 1).all())
        assert not torch.equal(layer.pre_feedforward_layernorm.weight, ld.pre_feedforward_layernorm.weight)
        assert torch.equal(layer.post_attention_layernorm.weight, ld.post_attention_layernorm.weight)
        assert bool((layer.mlp.gate_proj.smooth == 1).all())

    # another stage after SVDQuant on k_proj (its module is not SVDQuant's last word): q/k/v keep λ
    model = _compressed("llama", _recipe([_stage(16), {"method": "eora", "rank": 2, "targets": r"k_proj"}]), tokens)
    dense = _tiny("llama")
    for ld, layer in zip(dense.model.layers, model.model.layers):
        assert torch.equal(layer.input_layernorm.weight, ld.input_layernorm.weight)
        assert not bool((layer.self_attn.q_proj.smooth == 1).all())
        assert not torch.equal(layer.post_attention_layernorm.weight, ld.post_attention_layernorm.weight)


def test_no_fold_without_smoothing_or_when_different_vectors(tokens):
    from tensorpress.compress.svdquant import SVDQuant
    model = _compressed("llama", _recipe(_stage(16, smooth=False)), tokens)
    dense = _tiny("llama")
    assert all(torch.equal(p, dense.get_parameter(n)) for n, p in model.named_parameters() if "layernorm" in n)

    # a group whose λ differ (one linear fell back to no smoothing) keeps its vectors
    model = _compressed("llama", _recipe(_stage(16, fold_smoothing=False)), tokens)
    layer = model.model.layers[0]
    w0 = layer.input_layernorm.weight.clone()
    layer.self_attn.k_proj.smooth.fill_(1.0)
    comp = SVDQuant(**{k: v for k, v in _stage(16).items() if k != "method"})
    names = list(QKV + GATE_UP + UNFOLDED)
    assert comp.finish_block(layer, names) == [f"{MLP_NORM['llama']}.weight"]
    assert torch.equal(layer.input_layernorm.weight, w0) and not bool((layer.self_attn.q_proj.smooth == 1).all())
    assert comp.finish_block(layer, names) == []                          # folded already: nothing to do


# --- architecture knowledge -------------------------------------------------------------------------

def test_norm_readers_per_family_and_unknown_layers(family):
    layer = make_tiny(family).model.layers[0]
    got = norm_readers(layer)
    assert got == [NormReaders("input_layernorm", QKV, family == "gemma"),
                   NormReaders(MLP_NORM[family], GATE_UP, family == "gemma")]

    class Custom(type(layer)):                 # a subclass may change the forward: not recognised
        pass
    layer.__class__ = Custom
    assert norm_readers(layer) == []
    layer.__class__ = Custom.__mro__[1]
    layer.input_layernorm = torch.nn.LayerNorm(64)                       # another norm type: that one skipped
    assert [g.norm for g in norm_readers(layer)] == [MLP_NORM[family]]
    assert norm_readers(torch.nn.Linear(3, 3)) == []


def test_scaled_norm_weight_precision_guard():
    s = torch.tensor([0.5, 2.0, 1e-3, 10.0], dtype=torch.float64)
    w = torch.tensor([1.0, -0.5, 2.0, 0.0])
    torch.testing.assert_close(scaled_norm_weight(w, False, s).double(), w.double() * s)
    g = scaled_norm_weight(w, True, s)
    torch.testing.assert_close((1 + g.double()), (1 + w.double()) * s, rtol=1e-5, atol=0)
    # bf16: Llama-style is one rounding, Gemma's 1 + w' cannot hold 3e-3 precisely
    assert scaled_norm_weight(w.bfloat16(), False, s) is not None
    assert scaled_norm_weight(w.bfloat16(), True, s) is None
    assert scaled_norm_weight(w.bfloat16(), True, torch.tensor([0.5, 2.0, 1.5, 0.75])) is not None
    assert scaled_norm_weight(w, False, torch.tensor([1.0, float("inf"), 1.0, 1.0])) is None
    assert scaled_norm_weight(w.half(), False, torch.tensor([1e6, 1.0, 1.0, 1.0])) is None   # overflows fp16


def test_identity_smoothing_cache_follows_the_buffer():
    m = SVDQuantLinear(32, 8, False, 4, 32, act_bits=16)
    assert m._smooth_arg() is None
    m.load_state_dict({**m.state_dict(), "smooth": torch.full((32,), 2.0)})
    assert m._smooth_arg() is m.smooth
    m.smooth.fill_(1.0)
    assert m._smooth_arg() is None
    m.smooth = torch.full((32,), 3.0)
    assert m._smooth_arg() is m.smooth


# --- 3. checkpoint, streaming, export ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_folded_checkpoint_round_trip(tmp_path, tokens, family):
    recipe = _recipe(_stage(4))
    model = _compressed(family, recipe, tokens)
    out = _logits(model, tokens)
    path = tp.save(model, tmp_path / "ck", recipe=recipe)
    loaded = tp.load(path)
    assert torch.equal(_logits(loaded, tokens), out)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    assert bool((loaded.model.layers[0].self_attn.q_proj.smooth == 1).all())
    assert not bool((loaded.model.layers[0].self_attn.o_proj.smooth == 1).all())


def test_streaming_equals_in_memory_with_folding(tmp_path, tokens):
    from safetensors.torch import load_file
    from tensorpress.compress.streaming import compress_streaming
    from tensorpress.modeling import load_model
    d = tmp_path / "m"
    _tiny("mistral", layers=3).save_pretrained(d)
    recipe = _recipe(_stage(16))
    model, _ = load_model(d)
    compress_model(model, recipe, tokens, batch_size=2, progress=False)
    mem = tp.save(model, tmp_path / "mem", recipe=recipe)
    compress_streaming(d, recipe, tokens, tmp_path / "stream", batch_size=2, progress=False)

    def tensors(p):
        out = {}
        for f in sorted(p.glob("*.safetensors")):
            out.update(load_file(f))
        return out
    a, b = tensors(tmp_path / "stream"), tensors(mem)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    dense = _tiny("mistral", layers=3)
    for i in range(3):
        k = f"model.layers.{i}.input_layernorm.weight"
        assert not torch.equal(a[k], dense.get_parameter(k))            # the folded norm is in the shard
    modules = json.loads((tmp_path / "stream" / "config.json").read_text())["quantization_config"]["modules"]
    assert {c["format"] for c in modules.values()} == {"svdquant"}


def test_dense_export_of_a_folded_model(tmp_path, tokens):
    """The dense weight of a folded module is ``Ŵ`` (its input is ``x ⊘ λ``): beside the folded norm
    it computes what the tensorpress model does."""
    from transformers import AutoModelForCausalLM
    from tensorpress.export import export
    recipe = _recipe(_stage(16))
    model = _compressed("gemma", recipe, tokens)
    ref = _logits(model, tokens)
    out = export(model, tmp_path / "dense", "dense", recipe=recipe)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    layer = loaded.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    got = _logits(loaded, tokens)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


# --- 4. bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yes", 1, None, "true"])
def test_bad_fold_smoothing_value(value):
    with pytest.raises(TensorpressError, match="fold_smoothing must be true or false") as e:
        Recipe.from_dict({"stages": [{"method": "svdquant", "fold_smoothing": value}]})
    assert "\n" not in str(e.value)
