"""Native checkpoints: round trips (native and through transformers), atomicity, and refusal of
truncated, tampered, hostile or inconsistent files."""
import json
import os

import pytest
import torch

import tensorpress as tp
from conftest import make_tiny
from tensorpress.checkpoint import io as ckio
from tensorpress.compress.apply import compress_model
from tensorpress.errors import CheckpointError
from tensorpress.recipe import Recipe

MIXED = {"stages": [
    {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "targets": "q_proj|k_proj|v_proj"},
    {"method": "gptq", "bits": 3, "group_size": 16, "sym": False, "targets": "gate_proj"},
    {"method": "svd-llm", "ratio": 0.7, "targets": "o_proj|down_proj"},
    {"method": "rtn", "bits": 8, "group_size": -1, "targets": "up_proj"},
]}


def _compressed(family, tokens, tied=None):
    model = make_tiny(family, tied=tied)
    compress_model(model, Recipe.from_dict(MIXED), tokens, batch_size=4, progress=False)
    return model


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("gemma", True)])
def test_round_trip_native_and_transformers(tmp_path, tokens, family, tied):
    from transformers import AutoModelForCausalLM
    model = _compressed(family, tokens, tied)
    with torch.no_grad():
        ref = model(tokens).logits
    path = tp.save(model, tmp_path / "ckpt", recipe=Recipe.from_dict(MIXED))
    cfg = json.loads((path / "config.json").read_text())
    formats = {v["format"] for v in cfg["quantization_config"]["modules"].values()}
    assert formats == {"quant", "lowrank"}
    assert (path / "tensorpress-recipe.yaml").is_file()
    loaded = tp.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, ref)
        hf = AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(hf(tokens).logits, ref)
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"


def test_sharded_save(tmp_path, tokens):
    model = _compressed("llama", tokens)
    path = tp.save(model, tmp_path / "s", max_shard_bytes=50_000)
    assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(tp.load(path)(tokens).logits, model(tokens).logits)


@pytest.fixture
def saved(tmp_path, tokens):
    return tp.save(_compressed("llama", tokens), tmp_path / "c")


def test_existing_output_refused(saved):
    with pytest.raises(CheckpointError, match="already exists"):
        tp.save(make_tiny("llama"), saved)


def test_truncated_shard(saved):
    p = saved / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        tp.load(saved)


def test_tampered_shard(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        tp.load(saved)


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_path_traversal_shard_name(saved):
    def evil(cfg):
        shards = cfg["quantization_config"]["shards"]
        shards["../../etc/passwd.safetensors"] = shards.pop("model.safetensors")
    _edit_config(saved, evil)
    with pytest.raises(CheckpointError, match="refusing shard name"):
        tp.load(saved)


def test_pickle_shard_name_refused(saved):
    def evil(cfg):
        shards = cfg["quantization_config"]["shards"]
        shards["pytorch_model.bin"] = shards.pop("model.safetensors")
    _edit_config(saved, evil)
    with pytest.raises(CheckpointError, match="refusing"):
        tp.load(saved)


def test_header_disagrees_with_config(saved):
    def lie(cfg):
        m = cfg["quantization_config"]["modules"]["model.layers.0.self_attn.q_proj"]
        m["bits"] = 8
    _edit_config(saved, lie)
    with pytest.raises(CheckpointError, match="config\\s+implies|implies"):
        tp.load(saved)


def test_future_format_version(saved):
    _edit_config(saved, lambda c: c["quantization_config"].__setitem__("format_version", 99))
    with pytest.raises(CheckpointError, match="not supported"):
        tp.load(saved)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        tp.load(tmp_path)
    (tmp_path / "config.json").write_text("{trunc")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        tp.load(tmp_path)


def test_crash_during_save_leaves_nothing(tmp_path, tokens, monkeypatch):
    model = _compressed("llama", tokens)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        tp.save(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []
