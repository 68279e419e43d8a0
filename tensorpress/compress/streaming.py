"""Compress a model larger than memory, one decoder block at a time, and resume an interrupted run.

The model is built as a skeleton whose parameters live on the ``meta`` device (no memory). Weights
are read from the model directory's memory-mapped safetensors shards only when their block is
reached: block ``i`` is materialised, its statistics collected, its linears compressed by the same
:func:`~.apply.compress_block` the in-memory runner uses, its compressed tensors written to their
own shard, and the block is dropped before block ``i + 1`` is read. Resident memory is therefore
one block, the embeddings/head, and the calibration activations of the current block (spilled to
disk above ``activation_budget_mb``): it does not grow with depth.

Every finished block is recorded in a work directory next to the output (``.OUT.tensorpress-run``):
its shard (written to a temporary name, fsynced, renamed) and then ``progress.json`` (same), which
holds the block's shard checksum, module configs and per-layer log. ``resume=True`` checks that the
work directory belongs to the same model, recipe and calibration tokens, verifies the finished
shards, recomputes the next block's inputs by running the finished blocks forward (no compression)
and continues; the compressors are deterministic, so the result equals an uninterrupted run's. The
checkpoint itself is assembled in one atomic rename at the end (see :mod:`..checkpoint.io`), so a
kill at any moment leaves either no checkpoint or a complete one.

Not streamed (a clear error): GGUF inputs, Fisher-based stages (FWSVD needs backward passes through
the whole model) and ``allocation: sensitivity`` (a dense pass over every block before compressing).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..calib.pipeline import ActivationStore, capture, release_memory, run_block
from ..checkpoint.format import build_quantization_config, replace_modules
from ..checkpoint.io import CONFIG, _fsync_dir, _sha256, _unique_state, atomic_dir
from ..errors import TensorpressError
from ..evaluate import peak_rss_bytes
from ..modeling import decoder_layers, layers_prefix
from .apply import LayerRecord, allocate_budgets, compress_block, plan, prepare

PROGRESS = "progress.json"
STATE_VERSION = 1


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tensorpress-run"


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _MappedShard:
    """One safetensors file, memory-mapped. A tensor is copied out of the mapping and the pages it
    occupied are handed back at once (``MADV_DONTNEED`` on clean file pages: they are re-read from the
    file if touched again), so reading a whole model block by block never makes it resident."""

    def __init__(self, path: Path):
        import mmap
        import struct
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise TensorpressError(f"{path.name} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TensorpressError(f"{path.name} has a corrupted safetensors header") from None
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if not isinstance(header, dict):
            raise TensorpressError(f"{path.name} has a corrupted safetensors header")
        header.pop("__metadata__", None)
        self.base, self.size, self.header = 8 + n, size, header

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        import mmap
        import warnings
        info = self.header[name]
        try:
            dtype, shape = _DTYPES[info["dtype"]], [int(x) for x in info["shape"]]
            start, end = (self.base + int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TensorpressError(f"{self.path.name}: bad header entry for {name}") from None
        numel = 1
        for x in shape:
            numel *= x
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or end - start != numel * itemsize or not self.base <= start <= end <= self.size:
            raise TensorpressError(f"{self.path.name}: tensor {name} lies outside the file or disagrees with its "
                                   "shape (truncated or corrupted?)")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():          # the mapping is read-only; the tensor is copied at once
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(self.mm, dtype=dtype, count=numel, offset=start)
        t = view.clone().reshape(shape)
        del view
        page = mmap.PAGESIZE
        lo = start // page * page
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        except (AttributeError, OSError, ValueError):   # not Linux: the kernel reclaims them under pressure
            pass
        return t


class WeightSource:
    """The tensors of a HF model directory by name, read lazily from its memory-mapped safetensors
    shards (a tensor costs memory only once read) and converted to ``dtype``."""

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise TensorpressError(f"{index} is not a valid safetensors index") from None
        else:
            names = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not names:
            raise TensorpressError(f"{model_dir} has no .safetensors weights")
        self.where = {}
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise TensorpressError(f"refusing weight shard name {name!r} (must be a plain .safetensors file name)")
            if not (model_dir / name).is_file():
                raise TensorpressError(f"weight shard {name} is missing")
            shard = _MappedShard(model_dir / name)
            for k in shard.keys():
                self.where[k] = shard

    def get(self, name: str) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            raise TensorpressError(f"the model's weight files have no tensor {name}")
        t = f.get(name)
        return t.to(self.dtype) if t.is_floating_point() else t


def _skeleton(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool):
    """The model with every parameter on ``meta`` (buffers such as rotary frequencies stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise TensorpressError(f"could not read the model config in {model_dir}: {str(e).splitlines()[0]}") from None
    if getattr(config, "quantization_config", None) is not None:
        raise TensorpressError(f"{model_dir} is already quantised ({type(config.quantization_config).__name__}); "
                               "stream-compress a dense model")
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def _materialise(module: nn.Module, prefix: str, source) -> None:
    """Give every meta parameter/buffer of ``module`` its tensor (``source(full_name)``)."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.device.type == "meta":
            _set_tensor(module, name, source(f"{prefix}{name}"))


def _non_block_names(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())
            if not n.startswith(prefix + ".")]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_shard(path: Path, tensors: dict) -> str:
    from safetensors.torch import save_file
    from .. import __version__
    _atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p,
                                            metadata={"format": "pt", "producer": f"tensorpress {__version__}"}))
    return _sha256(path)


def fingerprint(model_dir: Path, recipe, samples: torch.Tensor, batch_size: int, stats_source: str) -> str:
    """What a resumed run must share with the interrupted one: model (config and weight files),
    recipe, calibration tokens and the settings that change the result."""
    h = hashlib.sha256()
    h.update((model_dir / CONFIG).read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    h.update(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode())
    h.update(samples.contiguous().numpy().tobytes())
    h.update(f"{tuple(samples.shape)}:{batch_size}:{stats_source}".encode())
    return h.hexdigest()


class _Progress:
    """``progress.json`` of the work directory: finished blocks, rewritten atomically after each."""

    def __init__(self, work: Path, fp: str, resume: bool):
        self.path = work / PROGRESS
        if self.path.exists() and not resume:
            raise TensorpressError(f"an interrupted run left {work}: pass --resume to continue it, or remove it "
                                   "to start again")
        self.state = {"version": STATE_VERSION, "fingerprint": fp, "blocks": {}}
        if resume and self.path.exists():
            try:
                state = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TensorpressError(f"{self.path} is corrupted; remove {work} to start again") from None
            if state.get("version") != STATE_VERSION or state.get("fingerprint") != fp:
                raise TensorpressError(f"{work} belongs to a run with another model, recipe or calibration data; "
                                       "remove it to start again")
            self.state = state
        work.mkdir(parents=True, exist_ok=True)

    def done(self, i: int, work: Path) -> dict | None:
        """The record of block ``i`` if finished and its shard intact, else ``None``."""
        b = self.state["blocks"].get(str(i))
        if b is None:
            return None
        p = work / b["shard"]
        if not p.is_file() or _sha256(p) != b["sha256"]:
            return None
        return b

    def record(self, i: int, entry: dict) -> None:
        self.state["blocks"][str(i)] = entry
        _atomic_write(self.path, lambda p: p.write_text(json.dumps(self.state, indent=1)))


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def check_streamable(stages_by_name: dict, recipe) -> None:
    for full, stages in stages_by_name.items():
        for s in stages:
            if "fisher" in s.compressor.requires:
                raise TensorpressError(f"recipe {recipe.name}: '{s.compressor.name}' needs the Fisher information "
                                       "(backward passes through the whole model) and cannot be streamed; run "
                                       "without --stream")
            if getattr(s.compressor, "needs_sensitivity", False):
                raise TensorpressError(f"recipe {recipe.name}: 'allocation: sensitivity' measures every block before "
                                       "compressing and cannot be streamed; run without --stream")
            if getattr(s.compressor.params, "recovery", None) is not None:
                raise TensorpressError(f"recipe {recipe.name}: recovery fine-tuning trains the whole sorted model "
                                       "and cannot be streamed; run without --stream")


@torch.no_grad()
def compress_streaming(model_dir: str | os.PathLike, recipe, samples: torch.Tensor, out: str | os.PathLike, *,
                       batch_size: int | None = None, stats_source: str | None = None, resume: bool = False,
                       activation_budget_mb: float | None = None, tokenizer=None, extra_files=None,
                       progress: bool = True, on_record=None, dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, _stop_after_block: int | None = None) -> list[LayerRecord]:
    """Compress the HF model in ``model_dir`` with ``recipe`` into a native checkpoint at ``out``,
    holding one decoder block in memory at a time; see the module docstring. ``extra_files`` may be a
    callable ``records -> {name: text}`` (evaluated when the checkpoint is assembled). Returns every
    linear's record (those of blocks finished before a resume included, as recorded then).

    ``_stop_after_block`` (tests) raises :class:`KeyboardInterrupt` after that block is recorded.
    """
    model_dir, out = Path(model_dir), Path(out)
    if out.exists():
        raise TensorpressError(f"output path {out} already exists (choose another or remove it)")
    batch_size = batch_size or recipe.calibration["batch_size"]
    stats_source = stats_source or recipe.calibration["stats_source"]
    source = WeightSource(model_dir, dtype)
    model = _skeleton(model_dir, dtype, trust_remote_code)
    prefix = layers_prefix(model)
    layers = decoder_layers(model)
    n = len(layers)
    check_streamable(plan(model, recipe), recipe)
    job = prepare(model, recipe, samples, stats_source=stats_source, fisher={}, progress=progress)
    work = work_dir_for(out)
    prog = _Progress(work, fingerprint(model_dir, recipe, samples, batch_size, stats_source), resume)

    # Embeddings, final norm, head. A tied head is the embedding's parameter (weight files store it
    # once): tie first so that it is not looked up, and again after the embedding is replaced.
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    rest = _non_block_names(model, prefix)
    params = dict(model.named_parameters())
    for name in rest:
        t = params[name] if name in params else model.get_buffer(name)
        if t.device.type == "meta":
            _set_tensor(model, name, source.get(name))
    if tied:
        model.tie_weights()
    if any(t.device.type == "meta" for n, t in model.named_parameters() if not n.startswith(prefix + ".")):
        raise TensorpressError(f"could not give every non-block parameter of {model_dir} its weights")
    budget = None if activation_budget_mb is None else int(activation_budget_mb * 2**20)
    store = ActivationStore(work / "activations", budget)
    cap = capture(model, samples, batch_size, hidden=store)
    allocate_budgets(model, recipe, job.stages_by_name, cap, None, progress)
    hidden = cap.hidden

    records: list[LayerRecord] = []
    job.on_record = on_record
    job.bar = tqdm(total=len(job.stages_by_name), desc=f"compress [{recipe.name}]", unit="linear",
                   disable=not progress)
    for i in range(n):
        full_prefix = f"{prefix}.{i}."
        calls = [c[i] for c in cap.calls]
        needed = i < job.last                       # do later blocks need this block's outputs?
        finished = prog.done(i, work)
        if finished is not None:
            recs = [LayerRecord(**{**r, "module": r.get("module", {})}) for r in finished["records"]]
            records += recs
            job.bar.update(len(recs))
            if needed:                               # recompute the next inputs, no compression
                layer = _load_block(layers[i], full_prefix, work / finished["shard"], finished["modules"],
                                    source, dense=job.dense, dtype=dtype)
                run_block(layer, hidden, calls, inplace=True)
        else:
            layer = layers[i]
            _materialise(layer, full_prefix, source.get)
            # (an untargeted block before the last target is only run; later blocks are only copied)
            recs = compress_block(job, i, layer, hidden, calls) if i <= job.last else []
            records += recs
            from ..nn import CompressedLinear
            modules = {f"{full_prefix}{k}": m.config() for k, m in layer.named_modules()
                       if isinstance(m, CompressedLinear)}
            state = {f"{full_prefix}{k}": v for k, v in _unique_state(layer).items()}
            shard = _shard_name(i, n + 1)
            sha = _save_shard(work / shard, state)
            prog.record(i, {"shard": shard, "sha256": sha, "modules": modules,
                            "records": [r.to_dict() for r in recs]})
        layers[i] = _Released()                     # drop the block: nothing reads it again
        release_memory()
        if _stop_after_block is not None and i == _stop_after_block:
            raise KeyboardInterrupt
    job.bar.close()
    store.clear()

    # Assemble the checkpoint: block shards hard-linked (or copied) into the atomic directory.
    with atomic_dir(out) as tmp:
        shards = {}
        for i in range(n):
            b = prog.state["blocks"][str(i)]
            _link_or_copy(work / b["shard"], tmp / b["shard"])
            shards[b["shard"]] = {"size": (tmp / b["shard"]).stat().st_size, "sha256": b["sha256"]}
        rest_tensors = _unique_state(model, set(rest))
        name = _shard_name(n, n + 1)
        shards[name] = {"size": 0, "sha256": _save_shard(tmp / name, rest_tensors)}
        shards[name]["size"] = (tmp / name).stat().st_size
        weight_map = {}
        for i in range(n):
            b = prog.state["blocks"][str(i)]
            for key in _shard_keys(tmp / b["shard"]):
                weight_map[key] = b["shard"]
        weight_map.update({k: name for k in rest_tensors})
        total = sum((tmp / s).stat().st_size for s in shards)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _copy_generation_config(model_dir, tmp)
        import yaml
        (tmp / "tensorpress-recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        files = extra_files(records) if callable(extra_files) else (extra_files or {})
        for fname, text in files.items():
            (tmp / fname).write_text(text)
        modules = {}
        for i in range(n):
            modules.update(prog.state["blocks"][str(i)]["modules"])
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        qc = build_quantization_config(nn.Module(), shards=shards, recipe=recipe.to_dict())
        qc["modules"] = modules
        cfg["quantization_config"] = qc
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    _remove_work(work)
    return records


class _Released(nn.Module):
    """Placeholder for a block that was compressed, written and dropped."""

    def forward(self, *a, **k):
        raise RuntimeError("this block was released by the streaming runner")


def _shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def _load_block(layer: nn.Module, full_prefix: str, shard: Path, modules: dict, source, *, dense: bool,
                dtype) -> nn.Module:
    """A finished block for recomputing activations: the dense one (dense statistics stream) or the
    compressed one rebuilt from its shard (the same tensors the uninterrupted run computed with)."""
    if dense:
        _materialise(layer, full_prefix, source.get)
        return layer
    from safetensors.torch import load_file
    rel = {k[len(full_prefix):]: cfg for k, cfg in modules.items()}
    replace_modules(layer, rel, dtype)
    tensors = load_file(shard)
    for k in layer.state_dict(keep_vars=True):
        if f"{full_prefix}{k}" not in tensors:
            raise TensorpressError(f"{shard.name} lacks {full_prefix}{k}; remove the work directory to start again")
    for k, t in tensors.items():
        _set_tensor(layer, k[len(full_prefix):], t)
    return layer


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _copy_generation_config(model_dir: Path, tmp: Path) -> None:
    import shutil
    p = model_dir / "generation_config.json"
    if p.is_file():
        shutil.copyfile(p, tmp / p.name)


def _remove_work(work: Path) -> None:
    import shutil
    shutil.rmtree(work, ignore_errors=True)
