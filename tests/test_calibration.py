"""Collectors and the layer-sequential pipeline, on tiny models of every supported family."""
import os
import sys

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny
from tensorpress.calib.collectors import InputCollector, collect_fisher
from tensorpress.calib.data import chunk, load_calibration
from tensorpress.calib.pipeline import capture, run_block
from tensorpress.errors import TensorpressError
from tensorpress.modeling import decoder_layers, target_linears


def test_gram_is_exact_average_and_shared_between_siblings(tokens):
    model = make_tiny("llama")
    layer = decoder_layers(model)[0]
    mods = target_linears(layer)
    col = InputCollector(mods, {n: {"gram", "abs_mean", "abs_max"} for n in mods})
    xs = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: xs.setdefault(n, []).append(i[0].detach()))
             for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
    cap = capture(model, tokens, batch_size=3)          # batches of 3, 3, 2: unequal sizes
    with col:
        run_block(layer, cap.hidden, [c[0] for c in cap.calls], after_batch=col.next_batch)
    for h in hooks:
        h.remove()
    for n in ("self_attn.q_proj", "mlp.down_proj"):
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs[n]]).double()
        st = col.stats[n]
        assert st.n_tokens == tokens.numel()
        assert torch.allclose(st.gram(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(st.abs_mean().double(), X.abs().mean(0), rtol=1e-5)
        assert torch.allclose(st.input_norm().double(), X.norm(dim=0), rtol=1e-5)
    assert torch.equal(col.stats["self_attn.q_proj"].gram_sum, col.stats["self_attn.k_proj"].gram_sum)


def test_capture_and_blocks_reproduce_the_model(family, tokens):
    """Running the captured inputs block by block must give the model's own final hidden states:
    proves masks, rotary embeddings and per-layer-type kwargs are captured right."""
    model = make_tiny(family, layers=4)
    with torch.no_grad():
        ref = model(tokens, output_hidden_states=True, use_cache=False).hidden_states
    cap = capture(model, tokens, batch_size=4)
    assert len(cap.hidden) == 2
    hidden = cap.hidden
    for i, layer in enumerate(decoder_layers(model)):
        hidden = run_block(layer, hidden, [c[i] for c in cap.calls])
    got = torch.cat(hidden)
    want = ref[-1]
    # transformers applies the final norm to the last hidden state it returns
    norm = model.model.norm
    assert torch.allclose(norm(got), want, atol=1e-5)


def test_non_finite_activations_are_reported():
    model = make_tiny("llama")
    layer = decoder_layers(model)[0]
    mods = target_linears(layer)
    col = InputCollector(mods, {n: {"gram"} for n in mods})
    with col, pytest.raises(TensorpressError, match="non-finite"):
        mods["mlp.down_proj"](torch.full((2, 96), float("nan")))


def test_fisher_matches_autograd():
    model = make_tiny("qwen2")
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.gate_proj"
    mod = model.get_submodule(name)
    stats = collect_fisher(model, ids, {name: mod}, progress=False)[name]
    fin = torch.zeros(mod.in_features, dtype=torch.float64)
    fout = torch.zeros(mod.out_features, dtype=torch.float64)
    for s in ids:
        model.zero_grad()
        mod.weight.requires_grad_(True)
        model(s[None], labels=s[None]).loss.backward()
        G = mod.weight.grad.double()
        fin += (G * G).sum(0)
        fout += (G * G).sum(1)
        mod.weight.requires_grad_(False)
        mod.weight.grad = None
    assert torch.allclose(stats.fisher_in, fin, rtol=1e-4)
    assert torch.allclose(stats.fisher_out, fout, rtol=1e-4)


def test_protocol_chunking_and_user_data(tmp_path):
    ids = torch.arange(1000)
    first = chunk(ids, 3, 100)
    assert torch.equal(first[1], torch.arange(100, 200))
    a, b = chunk(ids, 3, 100, seed=7), chunk(ids, 3, 100, seed=7)
    assert torch.equal(a, b) and len({int(r[0]) for r in a}) == 3
    with pytest.raises(TensorpressError, match="not enough tokens"):
        chunk(ids, 11, 100)
    assert load_calibration(torch.arange(600), None, 2, 300).shape == (2, 300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nottext": 1}\n')
    with pytest.raises(TensorpressError, match="bad.jsonl:2"):
        load_calibration(bad, object(), 1, 8)
    with pytest.raises(TensorpressError, match="does not exist"):
        load_calibration(tmp_path / "missing.txt", object(), 1, 8)


def test_user_calibration_sources(tmp_path):
    """Token tensors, text, jsonl, token files and a local `datasets` directory all give windows."""
    import datasets
    import numpy as np
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "abcdefghij" * 20
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "t.jsonl").write_text('{"text": "%s"}\n{"text": "%s"}\n' % (text[:100], text[100:]))
    save_file({"input_ids": torch.arange(200)}, tmp_path / "ids.safetensors")
    np.save(tmp_path / "ids.npy", np.arange(200))
    datasets.Dataset.from_dict({"text": [text]}).save_to_disk(str(tmp_path / "ds"))
    datasets.Dataset.from_dict({"input_ids": [list(range(100)), list(range(100, 200))]}).save_to_disk(str(tmp_path / "ids"))
    expect_text = tok(text, add_special_tokens=False)["input_ids"][:20]
    for src in ("t.txt", "ds"):
        got = load_calibration(tmp_path / src, tok, 2, 20)
        assert got.shape == (2, 20) and got[0].tolist() == expect_text, src
    # jsonl records are joined with a blank line, like the protocol text
    assert load_calibration(tmp_path / "t.jsonl", tok, 2, 20).shape == (2, 20)
    for src in ("ids.safetensors", "ids.npy", "ids"):
        got = load_calibration(tmp_path / src, None, 3, 50)
        assert torch.equal(got[1], torch.arange(50, 100)), src
    assert load_calibration(["hello world " * 10], tok, 2, 30).shape == (2, 30)


def test_shared_input_memo_survives_address_reuse():
    """q/k/v share one Gram per batch; a freed input whose address the next input reuses must not
    hand the next linear a stale Gram (regression: the memo was keyed by data_ptr alone)."""
    import torch.nn as nn
    from tensorpress.calib.collectors import InputCollector
    a, b = nn.Linear(96, 8), nn.Linear(96, 8)
    col = InputCollector({"a": a, "b": b}, {"a": {"gram"}, "b": {"gram"}})
    x1 = torch.randn(64, 96)
    ref_a = x1.T.double() @ x1.double()
    col._accumulate("a", x1)
    del x1
    x2 = torch.randn(64, 96) * 3           # the CPU allocator typically reuses x1's block here
    col._accumulate("b", x2)
    ref_b = x2.T.double() @ x2.double()
    assert torch.allclose(col.stats["a"].gram_sum, ref_a, atol=1e-4 * float(ref_a.abs().max()))
    assert torch.allclose(col.stats["b"].gram_sum, ref_b, atol=1e-4 * float(ref_b.abs().max()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux-only")
def test_release_pages_drops_mapped_weights_and_keeps_contents(tmp_path):
    """Replaced weights of a memory-mapped checkpoint leave RSS; contents (even written ones) stay."""
    import numpy as np
    from tensorpress.calib.pipeline import release_pages

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    path = tmp_path / "w.bin"
    np.arange(16 * 2**20, dtype=np.float32).tofile(path)            # 64 MiB
    w = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))   # private mapping, as safetensors
    ref = w.double().sum()
    w[7] = -1.0                                                        # one copy-on-write page
    before = rss_mb()
    assert release_pages([w, None]) >= 60 * 2**20
    assert before - rss_mb() > 40
    assert float(w[7]) == -1.0 and w.double().sum() == ref - 8
