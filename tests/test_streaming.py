"""Streaming (one block in memory) compression and resume: equal to the in-memory runner, resumable
after an interruption or a ``kill -9`` with an identical result, activations spilled to disk."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny
from tensorpress.checkpoint import load
from tensorpress.compress.apply import compress_model
from tensorpress.compress.streaming import compress_streaming, work_dir_for
from tensorpress.errors import TensorpressError
from tensorpress.recipe import Recipe

GPTQ = {"name": "gptq-tiny", "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}
RECIPES = {
    "gptq": GPTQ,
    "wanda24+eora": {"name": "wanda-eora", "stages": [{"method": "wanda", "pattern": "2:4"},
                                                      {"method": "eora", "rank": 4}]},
    "armor-dense-stats": {"name": "armor-tiny", "calibration": {"stats_source": "dense"},
                          "stages": [{"method": "armor", "block_size": 16, "iterations": 3}]},
    "svdllm-attn-only": {"name": "svd-attn", "stages": [{"method": "svd-llm", "ratio": 0.5, "targets": r"self_attn\."}]},
}


def _save_tiny(path: Path, family: str, layers: int = 3, tied=None) -> Path:
    model = make_tiny(family, layers=layers, tied=tied)
    model.save_pretrained(path)
    return path


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def _modules(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())["quantization_config"]["modules"]


def _in_memory(model_dir: Path, recipe, tokens, out: Path) -> Path:
    from tensorpress.checkpoint import save
    from tensorpress.modeling import load_model
    model, _ = load_model(model_dir)
    compress_model(model, recipe, tokens, batch_size=2, progress=False)
    save(model, out, recipe=recipe)
    return out


def _assert_same(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("family,recipe", [("llama", "gptq"), ("qwen2", "wanda24+eora"), ("gemma", "gptq"),
                                           ("mistral", "armor-dense-stats"), ("llama", "svdllm-attn-only")])
def test_streaming_equals_in_memory(tmp_path, tokens, family, recipe):
    d = _save_tiny(tmp_path / "m", family, layers=4 if family == "gemma" else 3)
    r = Recipe.from_dict(RECIPES[recipe])
    mem = _in_memory(d, r, tokens, tmp_path / "mem")
    recs = compress_streaming(d, r, tokens, tmp_path / "stream", batch_size=2, progress=False)
    assert len(recs) == len(_modules(mem)) or recipe == "svdllm-attn-only"
    assert _modules(tmp_path / "stream") == _modules(mem)
    _assert_same(_tensors(tmp_path / "stream"), _tensors(mem))
    assert not work_dir_for(tmp_path / "stream").exists()
    # the streamed checkpoint loads and computes what the in-memory one does
    a, b = load(tmp_path / "stream"), load(mem)
    torch.testing.assert_close(a(tokens[:2]).logits, b(tokens[:2]).logits)


def test_spilled_activations_give_the_same_checkpoint(tmp_path, tokens, monkeypatch):
    from tensorpress.calib import pipeline
    d = _save_tiny(tmp_path / "m", "llama")
    r = Recipe.from_dict(GPTQ)
    compress_streaming(d, r, tokens, tmp_path / "mem", batch_size=2, progress=False)
    spilled = []
    orig = pipeline.ActivationStore.__setitem__

    def spy(self, k, t):
        orig(self, k, t)
        spilled.append(self.spilled)
    monkeypatch.setattr(pipeline.ActivationStore, "__setitem__", spy)
    compress_streaming(d, r, tokens, tmp_path / "disk", batch_size=2, progress=False, activation_budget_mb=0)
    assert spilled and min(spilled) == 4                  # every one of the 4 batches lived on disk
    _assert_same(_tensors(tmp_path / "disk"), _tensors(tmp_path / "mem"))


def test_activation_store_round_trip(tmp_path):
    from tensorpress.calib.pipeline import ActivationStore
    s = ActivationStore(tmp_path / "a", budget_bytes=100)
    xs = [torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(1, 3, 4).bfloat16()]
    for x in xs:
        s.append(x)
    assert len(s) == 3 and s.spilled == 2                 # 96 bytes fit, the rest goes to disk
    for a, b in zip(s, xs):
        assert torch.equal(a, b) and a.dtype == b.dtype
    s[1] = xs[0] * 2
    assert torch.equal(s[1], xs[0] * 2)
    s.clear()
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("stop_after", [0, 1])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, tokens, stop_after):
    d = _save_tiny(tmp_path / "m", "qwen2")
    r = Recipe.from_dict(RECIPES["wanda24+eora"])
    compress_streaming(d, r, tokens, tmp_path / "ref", batch_size=2, progress=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress_streaming(d, r, tokens, out, batch_size=2, progress=False, _stop_after_block=stop_after)
    assert not out.exists() and work_dir_for(out).is_dir()
    with pytest.raises(TensorpressError, match="pass --resume"):
        compress_streaming(d, r, tokens, out, batch_size=2, progress=False)
    recs = compress_streaming(d, r, tokens, out, batch_size=2, progress=False, resume=True)
    assert sorted(x.name for x in recs) == sorted(_modules(tmp_path / "ref"))   # the log covers every linear
    _assert_same(_tensors(out), _tensors(tmp_path / "ref"))
    assert _modules(out) == _modules(tmp_path / "ref")


def test_resume_refuses_another_run(tmp_path, tokens):
    d = _save_tiny(tmp_path / "m", "llama")
    r = Recipe.from_dict(GPTQ)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress_streaming(d, r, tokens, out, batch_size=2, progress=False, _stop_after_block=0)
    with pytest.raises(TensorpressError, match="another model, recipe or calibration"):
        compress_streaming(d, r, tokens[:, :16], out, batch_size=2, progress=False, resume=True)
    other = Recipe.from_dict({**GPTQ, "stages": [{"method": "gptq", "bits": 3, "group_size": 32}]})
    with pytest.raises(TensorpressError, match="another model, recipe or calibration"):
        compress_streaming(d, other, tokens, out, batch_size=2, progress=False, resume=True)


def test_resume_recomputes_a_corrupted_block(tmp_path, tokens):
    d = _save_tiny(tmp_path / "m", "llama")
    r = Recipe.from_dict(GPTQ)
    compress_streaming(d, r, tokens, tmp_path / "ref", batch_size=2, progress=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress_streaming(d, r, tokens, out, batch_size=2, progress=False, _stop_after_block=1)
    shard = sorted(work_dir_for(out).glob("model-00002-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])             # truncated on disk: not trusted on resume
    compress_streaming(d, r, tokens, out, batch_size=2, progress=False, resume=True)
    _assert_same(_tensors(out), _tensors(tmp_path / "ref"))


def test_unstreamable_recipes_fail_clearly(tmp_path, tokens):
    d = _save_tiny(tmp_path / "m", "llama")
    with pytest.raises(TensorpressError, match="Fisher information"):
        compress_streaming(d, Recipe.load("fwsvd-p80"), tokens, tmp_path / "o", batch_size=2, progress=False)
    assert not work_dir_for(tmp_path / "o").exists()


KILL_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file
from tensorpress.compress.streaming import compress_streaming
from tensorpress.recipe import Recipe
model_dir, out, tok, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
r = Recipe.from_dict({"name": "gptq-kill", "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]})
compress_streaming(model_dir, r, load_file(tok)["ids"], out, batch_size=2, progress=False, resume=resume)
print("DONE")
"""


def test_kill_minus_9_then_resume_equals_uninterrupted(tmp_path, tokens):
    """SIGKILL a streaming run at random moments, resume until it finishes: the checkpoint equals an
    uninterrupted run's, and at no moment does a checkpoint exist before it is complete."""
    from safetensors.torch import save_file
    d = _save_tiny(tmp_path / "m", "llama", layers=4)
    save_file({"ids": tokens}, tmp_path / "tok.safetensors")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = lambda out, resume: [sys.executable, str(script), str(d), str(out), str(tmp_path / "tok.safetensors"),
                               "1" if resume else "0"]
    compress_streaming(d, Recipe.from_dict({**GPTQ, "name": "gptq-kill"}), tokens, tmp_path / "ref", batch_size=2,
                       progress=False)
    full = 30.0                                    # seconds: a generous bound for one run (startup included)
    out, rng, kills = tmp_path / "out", random.Random(0), 0
    progress = work_dir_for(out) / "progress.json"

    def finished_blocks():
        try:
            return len(json.loads(progress.read_text())["blocks"])
        except (OSError, ValueError, KeyError):
            return 0
    for attempt in range(4):       # killed after 1, 2, 3 finished blocks (+ a random moment), then left to finish
        p = subprocess.Popen(cmd(out, attempt > 0), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if attempt < 3:
            deadline = time.perf_counter() + 5 * full
            while p.poll() is None and finished_blocks() <= attempt and time.perf_counter() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))       # somewhere inside the next block
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                assert not out.exists() or (out / "config.json").is_file()
                continue
        assert p.wait(timeout=10 * full) == 0, p.stderr.read().decode()[-2000:]
        break
    assert kills >= 1 and out.is_dir()
    assert not progress.exists()                   # the work directory goes once the checkpoint is in place
    _assert_same(_tensors(out), _tensors(tmp_path / "ref"))


def test_cli_stream_and_resume(tmp_path, tokens, capsys):
    from safetensors.torch import save_file
    from tensorpress.cli import main
    d = _save_tiny(tmp_path / "m", "llama")
    save_file({"ids": tokens}, tmp_path / "tok.safetensors")
    rec = tmp_path / "r.yaml"
    import yaml
    rec.write_text(yaml.safe_dump(GPTQ))
    base = ["compress", str(d), "-r", str(rec), "--calib", str(tmp_path / "tok.safetensors"), "--batch-size", "2",
            "--no-eval", "-q"]
    assert main(base + ["-o", str(tmp_path / "a"), "--stream", "--activation-budget", "0"]) == 0
    assert (tmp_path / "a" / "layers.jsonl").read_text().count("\n") == 21
    assert json.loads((tmp_path / "a" / "report.json").read_text())["streamed"] is True
    assert main(base + ["-o", str(tmp_path / "b"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "a"), "--resume"]) == 2
    assert "already exists (the run it belongs to finished)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["-o", str(tmp_path / "c"), "--stream", "--activation-budget", "-1"])
    # the in-memory CLI run writes the same tensors
    assert main(base + ["-o", str(tmp_path / "mem")]) == 0
    _assert_same(_tensors(tmp_path / "a"), _tensors(tmp_path / "mem"))


def test_weight_source_reads_exactly_and_refuses_broken_shards(tmp_path):
    from safetensors.torch import save_file
    from tensorpress.compress.streaming import WeightSource
    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).bfloat16(),
          "e": torch.empty(0, 3)}
    save_file(ts, tmp_path / "model.safetensors")
    src = WeightSource(tmp_path, torch.float32)
    assert torch.equal(src.get("a"), ts["a"]) and torch.equal(src.get("b"), ts["b"])
    assert src.get("c").dtype == torch.float32 and torch.equal(src.get("c"), ts["c"].float())
    assert src.get("e").shape == (0, 3)
    with pytest.raises(TensorpressError, match="no tensor zz"):
        src.get("zz")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-8])             # truncated data
    with pytest.raises(TensorpressError, match="outside the file"):
        WeightSource(tmp_path).get("c")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + raw[8:])  # header length beyond the file
    with pytest.raises(TensorpressError, match="bad header length"):
        WeightSource(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../evil.safetensors"}}')
    with pytest.raises(TensorpressError, match="refusing weight shard name"):
        WeightSource(tmp_path)
