"""Faults and hostile input.

* ``kill -9`` at random moments of saves (fresh targets and overwrites, with the atomic exchange and
  with the two-rename fallback) never leaves a checkpoint that loads with the wrong content, nor a
  partial file at a visible path; leftovers of killed saves are removed by the next save.
* NaN/Inf in the calibration activations is a one-line error naming the linear, for every statistic
  (Gram, input norm, abs-mean, abs-max / input sample, Fisher), and never leaves NaN weights.
* Singular and rank-deficient statistics (fewer tokens than features, dead and duplicated input
  channels, an all-zero input) never give non-finite weights, for every registered compressor.
* Hostile checkpoints (pickles, path traversal, headers that disagree with the config, truncated or
  garbage shards, broken configs and module tables) are refused with a one-line CheckpointError, and
  exit code 2 through the CLI; pickles are never unpickled.
* Recipes and CLI argument lists fuzzed with hypothesis (bounded example counts) never produce a
  traceback: a recipe is built or refused with a TensorpressError, the CLI exits with 0 or 2.
"""
from __future__ import annotations

import json
import os
import pickle
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import tensorpress as tp
from conftest import VOCAB, make_tiny
from tensorpress.checkpoint import io as ckio
from tensorpress.compress import REGISTRY
from tensorpress.compress.apply import compress_model, plan
from tensorpress.errors import CheckpointError, TensorpressError
from tensorpress.nn import CompressedLinear
from tensorpress.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
RTN = {"stages": [{"method": "rtn", "bits": 4, "group_size": 32}]}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rtn_model(seed: int):
    model = make_tiny("llama", seed=seed)
    g = torch.Generator().manual_seed(seed)
    compress_model(model, Recipe.from_dict(RTN), torch.randint(0, VOCAB, (2, 16), generator=g), batch_size=2,
                   progress=False)
    return model


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Two different RTN-compressed tiny models saved as checkpoints: ``{tag: (path, state)}``."""
    d = tmp_path_factory.mktemp("refs")
    out = {}
    for tag, seed in (("A", 0), ("B", 1)):
        m = _rtn_model(seed)
        out[tag] = (tp.save(m, d / tag, extra_files={"tag.txt": tag}), _state(m))
    return out


def _same_state(model, ref: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


# --- kill -9 during saves -------------------------------------------------------------------------

# One interpreter imports torch and loads both models once, then forks a child per round that saves
# in a loop until the test SIGKILLs it: a kill costs a fork, not an interpreter start.
ZYGOTE = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
import tensorpress as tp
from tensorpress.checkpoint import io as ckio
root, ref_a, ref_b = sys.argv[1:4]
models = {"A": tp.load(ref_a), "B": tp.load(ref_b)}
print("ready", flush=True)
for line in sys.stdin:
    mode = line.strip()
    pid = os.fork()
    if pid == 0:
        try:
            if mode == "fallback":
                ckio._exchange = lambda a, b: False     # the two-rename path of platforms without it
                real_replace = os.replace

                def slow_replace(a, b):                 # widen the window between the two renames
                    real_replace(a, b)
                    if ".old-" in os.fspath(b):
                        time.sleep(0.03)
                os.replace = slow_replace
            i = 0
            while True:
                tag = "AB"[i % 2]
                tp.save(models[tag], os.path.join(root, "ckpt"), overwrite=True, extra_files={"tag.txt": tag},
                        max_shard_bytes=60_000)
                if i % 3 == 0:
                    tp.save(models[tag], os.path.join(root, f"fresh-{os.getpid()}-{i}"),
                            extra_files={"tag.txt": tag}, max_shard_bytes=60_000)
                i += 1
        finally:
            os._exit(0)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("dead", flush=True)
"""


def _check_loads_as_tagged(path: Path, refs) -> None:
    tag = (path / "tag.txt").read_text()
    assert tag in refs, f"{path}: bad tag {tag!r}"
    assert _same_state(tp.load(path), refs[tag][1]), f"{path} loads with the wrong tensors (tag {tag})"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the saving subprocess forks a child per kill")
def test_kill_during_save_never_leaves_a_bad_checkpoint(tmp_path, refs):
    root = tmp_path / "saves"
    root.mkdir()
    shutil.copytree(refs["A"][0], root / "ckpt")       # the target of the overwrites exists from the start
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(root), str(refs["A"][0]), str(refs["B"][0])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.strip()) for l in proc.stdout], daemon=True).start()

    def read():
        try:
            return lines.get(timeout=120)
        except queue.Empty:
            raise AssertionError("the saving subprocess stopped answering") from None

    rng = random.Random(20260801)
    kills, seen_fresh, mid_save, window, restored, was_missing = 0, 0, 0, 0, 0, False
    pid = None
    try:
        assert read() == "ready"
        for rnd in range(24):
            mode = "exchange" if rnd % 2 == 0 else "fallback"
            proc.stdin.write(mode + "\n")
            proc.stdin.flush()
            pid = int(read())
            # the child saves back to back (sharded: several files, an index, config.json last), so
            # the random delays land at any point of a save, over several whole saves
            threading.Event().wait(rng.uniform(0.002, 0.3))
            os.kill(pid, signal.SIGKILL)
            assert read() == "dead"
            pid = None
            kills += 1
            names = sorted(p.name for p in root.iterdir())
            visible = [n for n in names if not n.startswith(".")]
            assert all(n == "ckpt" or n.startswith("fresh-") for n in visible), names
            hidden = [n for n in names if n.startswith(".")]
            assert all(".partial-" in n or ".old-" in n for n in hidden), names
            assert len(hidden) <= 4, f"leftovers accumulate: {hidden}"
            mid_save += any(".partial-" in n for n in hidden)
            ck = root / "ckpt"
            olds = [root / n for n in hidden if n.startswith(".ckpt.old-")]
            if ck.exists():
                _check_loads_as_tagged(ck, refs)
                restored += was_missing
                was_missing = False
            else:
                # Only the fallback has a window between its two renames (or the previous round
                # left one and this child was killed before its first save renamed it back): the
                # previous checkpoint is then complete in the hidden .old sibling, loading says
                # where it is, and the next overwrite restores it.
                assert mode == "fallback" or was_missing, f"round {rnd}: an exchange overwrite lost the checkpoint"
                assert len(olds) == 1, names
                _check_loads_as_tagged(olds[0], refs)
                with pytest.raises(CheckpointError, match="interrupted overwrite"):
                    tp.load(ck)
                window += 1
                was_missing = True
            fresh = sorted((root / n for n in visible if n.startswith("fresh-")), key=lambda p: int(p.name.split("-")[-1]))
            for p in fresh:
                assert (p / "config.json").is_file() and (p / "tag.txt").is_file(), p
            if fresh and rnd % 2:           # every other round: the newest fresh checkpoint loads
                _check_loads_as_tagged(fresh[-1], refs)
            seen_fresh += len(fresh)
            for p in fresh:
                shutil.rmtree(p)
    finally:
        if pid is not None:                 # never leave a saving child behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdin.close()
        proc.kill()
        proc.wait(timeout=60)
    print(f"kills {kills}, mid-save {mid_save}, fallback window {window} (restored {restored}), "
          f"fresh checkpoints {seen_fresh}")
    assert kills >= 20 and seen_fresh > 0
    assert mid_save >= kills // 2, "the kills should land inside saves"
    # every writer is dead: the next save (here, this process) removes all their leftovers
    tp.save(_rtn_model(0), root / "ckpt", overwrite=True, extra_files={"tag.txt": "A"})
    assert sorted(p.name for p in root.iterdir()) == ["ckpt"]
    _check_loads_as_tagged(root / "ckpt", refs)


def test_error_between_fallback_renames_restores_the_old_checkpoint(tmp_path, refs, monkeypatch):
    out = shutil.copytree(refs["A"][0], tmp_path / "ck")
    monkeypatch.setattr(ckio, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(a, b)
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk gone"):
        tp.save(_rtn_model(1), out, overwrite=True, extra_files={"tag.txt": "B"})
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    _check_loads_as_tagged(out, refs)


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_failing_save_never_loses_the_copy_of_a_killed_overwrite(tmp_path, refs, monkeypatch, overwrite):
    """A killed fallback overwrite left the previous checkpoint in .ck.old-*. The next save, even if it
    fails too, keeps it: an overwrite renames it back first, a plain save removes it only after its
    own checkpoint is in place."""
    import safetensors.torch
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = shutil.copytree(refs["A"][0], tmp_path / f".ck.old-{ckio._host()}-{dead.pid}-abcd0001x0")
    model = _rtn_model(1)

    def boom(*a, **k):
        raise OSError("disk full")
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", boom)
        with pytest.raises(OSError, match="disk full"):
            tp.save(model, tmp_path / "ck", overwrite=overwrite, extra_files={"tag.txt": "B"})
    if overwrite:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
        _check_loads_as_tagged(tmp_path / "ck", refs)           # restored: the previous checkpoint
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]
        _check_loads_as_tagged(old, refs)
    tp.save(model, tmp_path / "ck", overwrite=True, extra_files={"tag.txt": "B"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    _check_loads_as_tagged(tmp_path / "ck", refs)


def test_stale_leftovers_are_removed_only_when_their_writer_is_dead(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ckio._host()
    names = {
        f".ck.partial-{host}-{dead.pid}-abcd0001x0": False,       # dead writer, this target
        f".other.partial-{host}-{dead.pid}-abcd0001x3": False,    # dead writer, another target
        f".ck.old-{host}-{dead.pid}-abcd0001x1": False,           # the target is being saved again
        f".gone.old-{host}-{dead.pid}-abcd0001x2": True,          # the only copy of 'gone': kept
        f".ck.partial-{host}-{os.getpid()}-{ckio._TOKEN}x99": True,   # a live writer (this process)
        f".ck.partial-{host}-{os.getppid()}-abcd0001x0": True,    # a live process
        f".ck.partial-otherhost-{dead.pid}-abcd0001x0": True,     # another host (shared file system)
        ".ck.partial-123": True,                                   # not ours: untouched
    }
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "f").write_text("x")
    tp.save(make_tiny("llama", layers=1), tmp_path / "ck")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"ck"} | {n for n, keep in names.items() if keep}


# --- NaN / Inf in the calibration activations ------------------------------------------------------

NAN_RECIPES = {   # recipe -> the statistic its stage reads (the Gram is always collected as well)
    "gptq": ({"method": "gptq", "bits": 4, "group_size": 32}, "gram"),
    "rtn": ({"method": "rtn", "bits": 4, "group_size": 32}, "gram"),
    "svd-llm": ({"method": "svd-llm", "rank": 8}, "gram"),
    "wanda": ({"method": "wanda", "sparsity": 0.5}, "input_norm"),
    "asvd": ({"method": "asvd", "rank": 8}, "abs_mean"),
    "svdquant": ({"method": "svdquant", "rank": 4, "group_size": 32, "act_group_size": 32, "alpha_grid": 2,
                  "iterations": 2}, "abs_max+input_sample"),
    "fwsvd": ({"method": "fwsvd", "rank": 8}, "fisher"),
}


@pytest.mark.parametrize("where", ["inf-embedding", "nan-after-block-0"])
@pytest.mark.parametrize("method", sorted(NAN_RECIPES))
def test_non_finite_activations_are_a_clear_error(method, where):
    model = make_tiny("llama")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    if where == "inf-embedding":
        with torch.no_grad():
            model.model.embed_tokens.weight[int(tokens[1, 5])] = float("inf")
    else:
        def poison(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, 3, 7] = float("nan")
            return (h, *out[1:]) if isinstance(out, tuple) else h
        model.model.layers[0].register_forward_hook(poison)
    stage, _ = NAN_RECIPES[method]
    with pytest.raises(TensorpressError) as e:
        compress_model(model, Recipe.from_dict({"stages": [stage]}), tokens, batch_size=2, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "non-finite" in msg.lower(), msg
    assert any(p in msg for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")), msg
    for n, t in model.state_dict().items():       # what was compressed before the error is finite
        if t.is_floating_point() and "embed_tokens" not in n:
            assert bool(torch.isfinite(t).all()), n


# --- singular / rank-deficient statistics ----------------------------------------------------------

SINGULAR = {
    "rtn": [{"method": "rtn", "bits": 4, "group_size": 32}],
    "gptq": [{"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}],
    "svd": [{"method": "svd", "rank": 8}],
    "svd-llm": [{"method": "svd-llm", "rank": 8}],
    "asvd": [{"method": "asvd", "rank": 8, "alpha": 1.0}],
    "fwsvd": [{"method": "fwsvd", "rank": 8}],
    "eora": [{"method": "rtn", "bits": 3, "group_size": 32}, {"method": "eora", "rank": 8}],
    "svd-correction": [{"method": "gptq", "bits": 3, "group_size": 32}, {"method": "svd-correction", "rank": 8}],
    "wanda": [{"method": "wanda", "sparsity": 0.5}, {"method": "eora", "rank": 4, "space": "activation"}],
    "magnitude": [{"method": "magnitude", "pattern": "2:4"}],
    "sparsegpt": [{"method": "sparsegpt", "pattern": "2:4"}],
    "armor": [{"method": "armor", "block_size": 16, "iterations": 8}],
    "lost": [{"method": "lost", "ratio": 0.5, "score": "act_l2"}],
    "svdquant": [{"method": "svdquant", "rank": 4, "group_size": 32, "act_group_size": 32, "alpha_grid": 3,
                  "iterations": 3, "residual_quantizer": "gptq"}],
    "uniql": [{"method": "uniql", "group_size": 32, "mlp_grid": 32, "head_grid": 8}],
}


REFUSES: set[str] = set()     # compressors allowed to refuse such statistics (none need to)


def _degenerate_llama():
    """A tiny Llama whose linears see: an all-zero input (layer 0 attention: q/k/v and o), dead input
    channels and exactly duplicated input channels (every other linear)."""
    model = make_tiny("llama")
    dead, a, b = 5, 10, 11          # residual-stream channels
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, b] = emb[:, a]
        for i, layer in enumerate(model.model.layers):
            at, mlp = layer.self_attn, layer.mlp
            if i == 0:
                layer.input_layernorm.weight.zero_()           # q/k/v read zeros; so does o_proj
            else:
                layer.input_layernorm.weight[dead] = 0
                layer.input_layernorm.weight[b] = layer.input_layernorm.weight[a]
                at.v_proj.weight[3] = 0                         # o_proj: dead channel (per q head)
                at.v_proj.weight[1] = at.v_proj.weight[0]       # ... and duplicated ones
            layer.post_attention_layernorm.weight[dead] = 0
            layer.post_attention_layernorm.weight[b] = layer.post_attention_layernorm.weight[a]
            mlp.up_proj.weight[7] = 0                           # down_proj: a dead channel
            mlp.up_proj.weight[9] = mlp.up_proj.weight[8]       # ... and a duplicated one
            mlp.gate_proj.weight[9] = mlp.gate_proj.weight[8]
            for w in (at.o_proj.weight, mlp.down_proj.weight):  # keep residual channels a, b equal
                w[b] = w[a]
    return model


def test_degenerate_model_is_degenerate():
    """The statistics the test below feeds the compressors are what it says they are."""
    model = _degenerate_llama()
    seen = {}

    def keep(n):
        def hook(mod, args, out):
            seen[n] = args[0].reshape(-1, args[0].shape[-1])
        return hook
    for n, m in model.named_modules():
        if n.endswith("_proj"):
            m.register_forward_hook(keep(n))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4)))
    L0, L1 = "model.layers.0.", "model.layers.1."
    for n in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert not seen[L0 + n].any(), n                                        # all-zero inputs
    for x, dead, a, b in ((seen[L1 + "self_attn.q_proj"], 5, 10, 11), (seen[L0 + "mlp.up_proj"], 5, 10, 11),
                          (seen[L1 + "mlp.down_proj"], 7, 8, 9), (seen[L1 + "self_attn.o_proj"], 3, 0, 1)):
        assert x.abs().sum() > 0 and not x[:, dead].any() and torch.equal(x[:, a], x[:, b])
        assert torch.linalg.matrix_rank(x.double().T @ x.double()) <= 8 < x.shape[1]


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_singular_statistics_give_finite_weights(method):
    """Every registered compressor, on 8 calibration tokens (fewer than the 64/96 input features: every
    Gram is rank-deficient) through a model with all-zero, dead and duplicated input channels: the
    weights are finite, or the run is refused with a one-line TensorpressError."""
    if method not in SINGULAR:
        pytest.fail(f"add a degenerate-statistics recipe for the new compressor {method!r} to SINGULAR")
    model = _degenerate_llama()
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    recipe = Recipe.from_dict({"stages": SINGULAR[method]})
    try:
        records = compress_model(model, recipe, tokens, batch_size=4, progress=False)
    except TensorpressError as e:                          # a clear one-line refusal, if it must
        assert method in REFUSES and str(e) and "\n" not in str(e), str(e)
        return
    assert method not in REFUSES
    assert len(records) == 14
    for r in records:
        assert r.rel_error == r.rel_error and r.rel_error < float("inf"), (r.name, r.rel_error)
    mods = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(mods) == 14
    for m in mods:
        assert bool(torch.isfinite(m.effective_weight()).all())
    for n, t in model.state_dict().items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), n
    with torch.no_grad():
        assert bool(torch.isfinite(model(tokens).logits).all())


@pytest.mark.parametrize("method", ["eora", "svdquant", "wanda", "svd-llm"])
def test_tiny_activations_give_finite_weights(method):
    """Activations ~1e-20 (their Gram ~1e-40, at the bottom of fp32): fp16 factors neither overflow
    (EoRA's and the activation-space correction's ``S⁻¹`` ~1e20, SVDQuant's smoothing spread between
    dead and live channels) nor underflow into a wrong layer."""
    model = _degenerate_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(1e-20)
            layer.post_attention_layernorm.weight.mul_(1e-20)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    compress_model(model, Recipe.from_dict({"stages": SINGULAR[method]}), tokens, batch_size=4, progress=False)
    for n, t in model.state_dict().items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), n


def test_svdquant_too_wide_smoothing_falls_back_to_none():
    """A smoothing vector whose spread the fp16 branch cannot hold is replaced by no smoothing."""
    from tensorpress.calib.collectors import InputCollector
    from tensorpress.compress.base import LinearContext
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(64, 64)
    with InputCollector({"l": lin}, {"l": {"gram", "abs_max", "input_sample"}}) as col:
        lin(x)
    comp = Recipe.from_dict({"stages": SINGULAR["svdquant"]}).stages[0].compressor
    lam = torch.ones(64, dtype=torch.float64)
    lam[[3, 17]] = 1e6                  # two columns of W·λ ~1e5: the branch takes them, fp16 cannot
    from tensorpress.compress.svdquant import effective_rows
    comp._prepared["l"] = (lam, effective_rows(col.stats["l"].input_sample(), comp.params.act_bits))  # as prepare_block
    m = comp.compress(LinearContext("l", lin, lin, col.stats["l"]))
    assert bool(torch.isfinite(m.effective_weight()).all()) and bool((m.smooth == 1).all())


# --- hostile checkpoints ---------------------------------------------------------------------------

@pytest.fixture
def ck(tmp_path, refs):
    return Path(shutil.copytree(refs["A"][0], tmp_path / "ck"))


def _cfg(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_cfg(path: Path, cfg) -> None:
    (path / "config.json").write_text(json.dumps(cfg))


def _reseal(path: Path) -> None:
    """Make the config's shard sizes and SHA-256 sums match the files again, as an attacker (or a
    consistent truncation) would: only the loader's own checks can then catch what is wrong."""
    cfg = _cfg(path)
    for name in cfg["quantization_config"]["shards"]:
        p = path / name
        if p.is_file():
            cfg["quantization_config"]["shards"][name] = {"size": p.stat().st_size, "sha256": ckio._sha256(p)}
    _write_cfg(path, cfg)


def _edit_tensors(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    p = path / "model.safetensors"
    tensors = load_file(p)
    fn(tensors)
    save_file(tensors, p, metadata={"format": "pt"})
    _reseal(path)


def _raw_shard(path: Path, data: bytes) -> None:
    (path / "model.safetensors").write_bytes(data)
    _reseal(path)


def _header(tensors: dict) -> bytes:
    h = json.dumps(tensors).encode()
    return struct.pack("<Q", len(h)) + h


Q = "model.layers.0.self_attn.q_proj"


def _qc(fn):
    def edit(path):
        cfg = _cfg(path)
        fn(cfg["quantization_config"])
        _write_cfg(path, cfg)
    return edit


def _top(fn):
    def edit(path):
        cfg = _cfg(path)
        fn(cfg)
        _write_cfg(path, cfg)
    return edit


def _rename_shard(new):
    def edit(path):
        cfg = _cfg(path)
        shards = cfg["quantization_config"]["shards"]
        shards[new(path)] = shards.pop("model.safetensors")
        _write_cfg(path, cfg)
    return edit


def _module(fn):
    return _qc(lambda qc: fn(qc["modules"]))


HOSTILE = {
    # shard names: absolute (even pointing at the real shard), nested, hidden, NUL, pickles
    "absolute-shard-name": (_rename_shard(lambda p: str((p / "model.safetensors").resolve())), "refusing shard name"),
    "nested-shard-name": (_rename_shard(lambda p: "sub/model.safetensors"), "refusing shard name"),
    "dotdot-shard-name": (_rename_shard(lambda p: "..\\..\\model.safetensors"), "refusing shard name"),
    "hidden-shard-name": (_rename_shard(lambda p: ".model.safetensors"), "refusing shard name"),
    "nul-shard-name": (_rename_shard(lambda p: "model.safetensors\x00.bin"), "refusing shard name"),
    "pt-shard-name": (_rename_shard(lambda p: "model.pt"), "refusing shard name"),
    "shard-info-not-a-mapping": (_qc(lambda qc: qc["shards"].update({"model.safetensors": "abc"})), "integer size"),
    "shard-size-a-string": (_qc(lambda qc: qc["shards"]["model.safetensors"].update(size="12")), "integer size"),
    "shards-a-list": (_qc(lambda qc: qc.update(shards=["model.safetensors"])), "lists no shards"),
    # the header disagrees with the config (sizes and sums resealed)
    "shape-disagrees": (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:1]})), "implies"),
    "dtype-disagrees": (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()})), "implies"),
    "qweight-as-float": (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()})), "implies"),
    "extra-tensor": (lambda p: _edit_tensors(p, lambda t: t.update({"evil": torch.zeros(3)})), "does not belong"),
    "missing-tensor": (lambda p: _edit_tensors(p, lambda t: t.pop(f"{Q}.qweight")), "lacks"),
    # truncated / garbage shards (resealed, so the size and SHA-256 checks pass)
    "truncated-in-length": (lambda p: _raw_shard(p, (p / "model.safetensors").read_bytes()[:5]), "not a valid safetensors"),
    "truncated-in-header": (lambda p: _raw_shard(p, (p / "model.safetensors").read_bytes()[:200]), "not a valid safetensors"),
    "truncated-in-data": (lambda p: _raw_shard(p, (p / "model.safetensors").read_bytes()[:-1000]), "not a valid safetensors"),
    "empty-shard": (lambda p: _raw_shard(p, b""), "not a valid safetensors"),
    "huge-header-length": (lambda p: _raw_shard(p, struct.pack("<Q", 1 << 62) + b"{}"), "not a valid safetensors"),
    "garbage-header": (lambda p: _raw_shard(p, struct.pack("<Q", 16) + b"\xff" * 16 + b"\0" * 64), "not a valid safetensors"),
    "offsets-past-the-end": (lambda p: _raw_shard(p, _header({f"{Q}.scales": {"dtype": "F16", "shape": [2, 64],
                                                    "data_offsets": [0, 1 << 40]}}) + b"\0" * 256), "not a valid safetensors"),
    "shape-claims-more-data": (lambda p: _raw_shard(p, _header({f"{Q}.scales": {"dtype": "F16", "shape": [1 << 30, 1 << 30],
                                                      "data_offsets": [0, 256]}}) + b"\0" * 256), "not a valid safetensors"),
    "pickle-named-safetensors": (lambda p: _raw_shard(p, pickle.dumps({"weight": [1.0, 2.0]})), "not a valid safetensors"),
    # config.json and the module table
    "config-not-json": (lambda p: (p / "config.json").write_text('{"model_type": "llama", '), "not valid JSON"),
    "config-binary": (lambda p: (p / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "config-a-list": (lambda p: (p / "config.json").write_text("[1, 2]"), "JSON object"),
    "no-quantization-config": (_top(lambda c: c.pop("quantization_config")), "not a tensorpress checkpoint"),
    "quantization-config-a-string": (_top(lambda c: c.update(quantization_config="tensorpress")), "not a tensorpress"),
    "unknown-model-type": (_top(lambda c: c.update(model_type="no-such-architecture")), "cannot build|transformers"),
    "remote-code": (_top(lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                                           "AutoModelForCausalLM": "evil.Evil"})),
                    "cannot build|transformers"),
    "bad-architecture-sizes": (_top(lambda c: c.update(num_attention_heads=0)), "cannot build|transformers"),
    "bad-dtype": (_top(lambda c: c.update(dtype="int8")), "dtype"),
    "module-not-in-architecture": (_module(lambda m: m.update({"model.layers.9.self_attn.q_proj": m[Q]})),
                                   "does not have"),
    "module-not-a-linear": (_module(lambda m: m.update({"model.embed_tokens": m.pop(Q)})), "not a linear"),
    "module-name-empty": (_module(lambda m: m.update({"": m[Q]})), "not a module name"),
    "module-entry-not-a-mapping": (_module(lambda m: m.update({Q: [1, 2]})), "bad module entry"),
    "module-huge-rank": (_module(lambda m: m[Q].update(rank=10**12)), "out of range"),
    "module-group-size-zero": (_module(lambda m: m[Q].update(group_size=0)), "out of range"),
    "module-bits-a-string": (_module(lambda m: m[Q].update(bits="4")), "out of range"),
    "module-unknown-format": (_module(lambda m: m[Q].update(format="evil")), "bad module entry"),
    "module-wrong-shape": (_module(lambda m: m[Q].update(in_features=32)), "does not match"),
    "modules-a-list": (_qc(lambda qc: qc.update(modules=[])), "modules"),
}


def _one_line_rc2(capsys, rc, match=None, progress_ok=False):
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if progress_ok:          # transformers' loading bars may come before the error line
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], err[-2000:]
    if match:
        import re
        assert re.search(match, lines[0]), lines[0]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly."""
    def refuse(*a, **k):
        raise AssertionError("a pickle was loaded")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoint_is_refused(ck, case, capsys, no_unpickling):
    from tensorpress.cli import main
    edit, match = HOSTILE[case]
    edit(ck)
    with pytest.raises(CheckpointError, match=match) as e:
        tp.load(ck)
    assert "\n" not in str(e.value)
    _one_line_rc2(capsys, main(["inspect", str(ck)]), match)


# ``tensorpress eval`` decides through tensorpress.modeling.is_tensorpress_checkpoint, which calls
# ``.get`` on whatever config.json holds: a JSON list or a string quantization_config is an internal
# error there (exit 1). Reported; modeling.py is outside this test's scope to fix.



@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoint_through_eval(ck, case, capsys, no_unpickling):
    from tensorpress.cli import main
    HOSTILE[case][0](ck)
    _one_line_rc2(capsys, main(["eval", str(ck), "--windows", "1", "--seq-len", "8"]), progress_ok=True)


def _evil_pickle(marker: Path) -> bytes:
    # Unpickling this creates ``marker`` (protocol 0: builtins.open(marker, "w")).
    return b"c__builtin__\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def test_pickles_beside_the_shards_are_never_loaded(ck, refs, tmp_path, capsys, no_unpickling):
    from transformers import AutoModelForCausalLM
    from tensorpress.cli import main
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin", "optimizer.pt"):
        (ck / name).write_bytes(_evil_pickle(marker))
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {f"{Q}.qweight": "pytorch_model.bin", f"{Q}.scales": "../../x.safetensors"}}))
    assert _same_state(tp.load(ck), refs["A"][1])            # the index is not what the loader reads
    assert main(["inspect", str(ck), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 14
    (ck / "model.safetensors.index.json").unlink()            # (transformers would follow it)
    hf = AutoModelForCausalLM.from_pretrained(ck)
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    assert not marker.exists()


def test_pickle_instead_of_the_shards(ck, tmp_path, capsys, no_unpickling):
    from tensorpress.cli import main
    marker = tmp_path / "pwned"
    (ck / "model.safetensors").unlink()
    (ck / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    with pytest.raises(CheckpointError, match="missing"):
        tp.load(ck)
    _one_line_rc2(capsys, main(["inspect", str(ck)]), "missing")
    assert not marker.exists()


def test_interrupted_overwrite_is_explained(tmp_path, refs):
    old = shutil.copytree(refs["A"][0], tmp_path / f".ck.old-{ckio._host()}-1-abcx0")
    with pytest.raises(CheckpointError, match=f"previous checkpoint in .*{old.name}"):
        tp.load(tmp_path / "ck")


def test_garbage_layer_log_in_inspect(ck, capsys):
    from tensorpress.cli import main
    (ck / "layers.jsonl").write_text('{"name": "x", "rel_error": 0.1}\nnot json\n[1]\n{"no_name": 1}\n'
                                    f'{{"name": "{Q}", "rel_error": "junk", "seconds": []}}\n')
    assert main(["inspect", str(ck), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 14


# --- fuzzing -------------------------------------------------------------------------------------

from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])

# Parameters that are valid for each method on the tiny models: the fuzz overrides some of them with
# junk, so that validation deeper than "unknown parameter" is reached.
GOOD = {"rtn": {"bits": 4, "group_size": 32}, "gptq": {"bits": 4, "group_size": 32}, "svd": {"rank": 8},
        "svd-llm": {"ratio": 0.5}, "asvd": {"rank": 8}, "fwsvd": {"budget": {"params": 0.5}},
        "eora": {"rank": 8}, "svd-correction": {"rank": 4}, "wanda": {"sparsity": 0.5},
        "magnitude": {"pattern": "2:4"}, "sparsegpt": {"n_keep": 2, "m": 4}, "armor": {"iterations": 5},
        "lost": {"ratio": 0.5}, "svdquant": {"rank": 8}}


def _param_names(method):
    import dataclasses
    return [f.name for f in dataclasses.fields(REGISTRY[method].Params)]


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.sampled_from(["2:4", "²:4", "٣:4", "4:8", "1:0", "0:4", "float16", "model", "eigen", "activation", "rtn", "gptq",
                     ".*", "(", "a{99999999999}", "-1", "sensitivity", "uniform", "both", "in", "abs_max",
                     "act_l2", "compact", "dense"]))
_values = st.recursive(_scalars, lambda ch: st.one_of(
    st.lists(ch, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(["params", "bits_per_weight"]), st.text(max_size=5), st.integers()),
                    ch, max_size=2)), max_leaves=5)
_keys = st.one_of(st.text(max_size=8), st.integers(-2, 2), st.none(), st.sampled_from(["targets", "exclude", "method"]))


def _stage(method):
    names = _param_names(method) + ["targets", "exclude"]
    near = st.dictionaries(st.sampled_from(names), _values, max_size=3).map(
        lambda junk: {**GOOD.get(method, {}), **junk, "method": method})
    far = st.dictionaries(st.one_of(st.sampled_from(names), _keys), _values, max_size=4).map(
        lambda junk: {**junk, "method": method})
    return st.one_of(near, far)


_stages = st.one_of(st.sampled_from(sorted(REGISTRY)).flatmap(_stage),
                    st.fixed_dictionaries({"method": _values}), _values)
_recipes = st.one_of(
    st.fixed_dictionaries({"stages": st.lists(_stages, min_size=1, max_size=3)},
                          optional={"name": _values, "description": _values, "junk": _values,
                                    "calibration": st.one_of(st.dictionaries(st.one_of(st.sampled_from(
                                        ["samples", "seq_len", "batch_size", "stats_source", "seed"]), _keys),
                                        _values, max_size=3), _values)}),
    st.dictionaries(_keys, _values, max_size=3), _values)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama", layers=1)


@settings(max_examples=int(os.environ.get("TP_FUZZ_EXAMPLES", 250)), **FUZZ)
@example({"stages": [{"method": "wanda", "pattern": "²:4"}]})
@example({"stages": [{"method": "svd", "ratio": float("nan")}]})
@example({"stages": [{"method": "svd", "budget": {"params": float("inf")}}]})
@example({"stages": [{"method": "eora", "rank": 4, "factor_dtype": []}]})
@example({"stages": [{"method": "rtn", 1: 2}]})
@example({"stages": [{"method": "rtn", "targets": "a{99999999999}"}]})
@example({1: 2, "x": 3})
@given(_recipes)
def test_fuzz_recipes(tiny, d):
    """A recipe dict is built (and planned on a model: rank/group checks, no work) or refused with a
    TensorpressError; nothing else escapes."""
    try:
        recipe = Recipe.from_dict(d)
    except TensorpressError as e:
        assert str(e)
        return
    try:
        plan(tiny, recipe)
    except TensorpressError as e:
        assert str(e)


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory, refs):
    d = tmp_path_factory.mktemp("cli")
    (d / "empty").mkdir()
    (d / "junk.txt").write_text("junk")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81 binary")
    (d / "list.yaml").write_text("[1, 2, 3]\n")
    (d / "bad.yaml").write_text("stages: [\n")
    (d / "nan.yaml").write_text("stages:\n  - method: svd\n    ratio: .nan\n")
    (d / "dir.yaml").mkdir()
    (d / "notjson").mkdir()
    (d / "notjson" / "config.json").write_text("{nope")
    (d / "weights").mkdir()                                # looks like a model, holds junk
    (d / "weights" / "config.json").write_text('{"model_type": "llama"}')
    (d / "weights" / "model.safetensors").write_bytes(b"junk")
    ck = Path(shutil.copytree(refs["A"][0], d / "ck"))      # a real checkpoint (already compressed)
    bad = Path(shutil.copytree(refs["A"][0], d / "badck"))  # one whose shard is truncated
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:100])
    return {"dir": d, "ck": ck, "badck": bad}


def _options(sub: str) -> list[str]:
    from tensorpress.cli import build_parser
    p = build_parser()
    subs = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return [o for a in subs.choices[sub]._actions for o in a.option_strings if o not in ("-h", "--help")]


SUBCOMMANDS = ["compress", "eval", "inspect", "recipes", "export"]


@st.composite
def _argv(draw, paths):
    d = paths["dir"]
    # No dense model in the pools: no fuzz case can start a compression. Paths longer than a file
    # name and a model directory with a junk .safetensors are checked by test_cli_path_and_weight_errors.
    places = st.sampled_from([str(paths["ck"]), str(paths["badck"]), str(d / "empty"), str(d / "junk.txt"),
                              str(d / "notjson"), str(d / "missing"), "missing/deeper", "",
                              " ", "-", "../..", "/", "default-x"])
    recipes = st.sampled_from(["rtn-w4g64", "gptq-w4g64", "svd-p80", "no-such-recipe", str(d / "binary.yaml"),
                               str(d / "list.yaml"), str(d / "bad.yaml"), str(d / "nan.yaml"), str(d / "dir.yaml"),
                               str(d / "junk.txt"), str(d / "missing.yaml")])
    outs = st.sampled_from([str(d / "out" / n) for n in "abc"] + [str(paths["ck"]), str(d / "junk.txt"), "rel-out"])
    numbers = st.sampled_from(["0", "-1", "-5", "1", "2", "1e3", "nan", "inf", "999999999999999999999", "0x10",
                               "2.5", "abc", "", "--"])
    junk = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
    words = st.sampled_from(["gptq", "compressed-tensors", "dense", "gptq_v2", "--junk", "-z", "--json=1", "-"])
    sub = draw(st.sampled_from(SUBCOMMANDS * 3 + ["", "nope", "--version", "-x"]))
    argv = [sub] if sub else []
    opts = _options(sub) if sub in SUBCOMMANDS else []
    if sub in ("compress", "eval", "inspect", "export") and draw(st.integers(0, 9)) > 0:
        argv.append(draw(places))                          # the positional, most of the time
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.integers(0, 9))
        if opts and kind < 6:
            o = draw(st.sampled_from(opts))
            argv.append(o)
            if o in ("--recipe", "-r"):
                argv.append(draw(recipes))
            elif o in ("--output", "-o"):
                argv.append(draw(outs))
            elif o in ("--calib",):
                argv.append(draw(st.one_of(places, recipes)))
            elif draw(st.booleans()):
                argv.append(draw(st.one_of(numbers, words, places)))
        else:
            argv.append(draw(st.one_of(numbers, words, places, recipes, junk)))
    return argv


def _run_cli(argv, capsys):
    from tensorpress.cli import main
    threads = torch.get_num_threads()
    try:
        rc = main(argv)
    except SystemExit as e:                 # argparse: usage errors (2) and --help (0)
        rc = e.code
    finally:
        torch.set_num_threads(threads)      # --threads must not leak into the rest of the suite
    captured = capsys.readouterr()
    assert rc in (0, 2), (argv, rc, captured.err[-2000:])
    assert "Traceback" not in captured.err, (argv, captured.err[-2000:])
    if rc == 2 and captured.err.strip():
        last = captured.err.strip().splitlines()[-1]
        assert last.startswith(("error: ", "tensorpress")) or "usage:" in captured.err, (argv, captured.err[-2000:])
    return rc, captured


@pytest.fixture
def cli_env(cli_paths, monkeypatch):
    monkeypatch.chdir(cli_paths["dir"])         # relative junk paths land in a temporary directory
    monkeypatch.delenv("TENSORPRESS_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return cli_paths


def test_fuzz_cli(cli_env, capsys):
    """Junk argument lists for every subcommand: exit code 0 or 2 (one-line errors, argparse usage
    errors), never 1 (an internal error) and never an exception."""
    @settings(max_examples=int(os.environ.get("TP_FUZZ_EXAMPLES", 300)), **FUZZ)
    @given(_argv(cli_env))
    def fuzz(argv):
        _run_cli(argv, capsys)

    fuzz()
    assert not (ROOT / "rel-out").exists() and not (ROOT / "missing").exists()


@pytest.mark.parametrize("argv", [
    ["inspect", "CK"], ["recipes"], ["export", "CK", "-f", "dense", "-o", "OUT/dense"],
    ["compress", "CK", "-r", "rtn-w4g64", "-o", "OUT/x"],                  # already compressed
    ["compress", "CK", "-r", "DIR/binary.yaml", "-o", "OUT/y"],           # a recipe that is not text
    ["compress", "CK", "-r", "DIR/nan.yaml", "-o", "OUT/y"],              # ratio: .nan
    ["compress", "CK", "-r", "\x00", "-o", "OUT/z"], ["compress", "CK", "-r", "r" * 300, "-o", "OUT/z"],
    ["eval", "CK", "--threads", "3"], ["inspect", "\x00"], ["inspect", "x" * 300], ["inspect", "BADCK"],
    ["export", "BADCK", "-f", "gptq", "-o", "OUT/g"],
    ["eval", "MISSING", "ENV:OMP_NUM_THREADS=lots"],
])
def test_cli_regressions(cli_env, capsys, monkeypatch, argv):
    d = cli_env["dir"]
    subst = {"CK": str(cli_env["ck"]), "BADCK": str(cli_env["badck"]), "MISSING": str(d / "missing")}
    args = []
    for a in argv:
        if a.startswith("ENV:"):
            k, v = a[4:].split("=")
            monkeypatch.setenv(k, v)
            continue
        a = subst.get(a, a)
        args.append(a.replace("OUT/", str(d / "out") + "/").replace("DIR/", str(d) + "/"))
    _run_cli(args, capsys)


# Paths too long for the file system, a config.json that is not a mapping, junk weights in a plain HF
# directory: one-line errors (exit 2) from eval, compress and export alike.
@pytest.mark.parametrize("argv", [["eval", "x" * 300], ["eval", "LISTCFG"], ["eval", "WEIGHTS"],
                                  ["compress", "WEIGHTS", "-r", "rtn-w4g64", "-o", "c"],
                                  ["export", "x" * 300, "-f", "gptq", "-o", "g"],
                                  ["compress", "x" * 300, "-r", "rtn-w4g64", "-o", "c"]])
def test_cli_path_and_weight_errors(cli_env, capsys, argv):
    d = cli_env["dir"]
    (d / "listcfg").mkdir(exist_ok=True)
    (d / "listcfg" / "config.json").write_text("[]")
    (d / "listcfg" / "model.safetensors").write_bytes(b"junk")
    _run_cli([a.replace("LISTCFG", str(d / "listcfg")).replace("WEIGHTS", str(d / "weights")) for a in argv], capsys)
