"""Atomic save and verified, strict load of native checkpoints.

Save writes everything into a hidden temporary directory next to the target, fsyncs it and renames
it into place, so a crash never leaves a directory at the target path. Load checks, before reading
any tensor: shard names (no paths), sizes and SHA-256 sums against the config, then every tensor's
name, shape and dtype against the module table; pickles are never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .format import QUANT_METHOD, build_quantization_config, check_quantization_config, replace_modules

MAX_SHARD_BYTES = 2 * 1024**3
CONFIG = "config.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with storage-shared (tied) tensors kept once, under their first name."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, dict]:
    """Write ``tensors`` as safetensors shards (split above ``max_shard_bytes``, with a
    ``model.safetensors.index.json`` when there are several). Returns ``{shard: {size, sha256}}``."""
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        b = v.numel() * v.element_size()
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += b
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    info, weight_map = {}, {}
    for name, part in zip(names, shards):
        p = directory / name
        save_file(part, p, metadata=metadata)
        info[name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        weight_map.update({k: name for k in part})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}, indent=1))
    return info


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a hidden temporary directory; on success fsync it and rename it to ``out``.

    On any exception (or a kill) ``out`` is untouched: no half-written directory ever sits there.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output path {out} already exists (choose another or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, recipe=None,
         extra_files: dict[str, str] | None = None, overwrite: bool = False,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``model`` (with compressed modules) as a native checkpoint at ``out``, atomically."""
    from .. import __version__

    with atomic_dir(out, overwrite) as tmp:
        shard_info = write_shards(tmp, _unique_state(model), {"format": "pt", "producer": f"tensorpress {__version__}"},
                                  max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except (ValueError, OSError):
                pass
        if recipe is not None:
            import yaml
            (tmp / "tensorpress-recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["quantization_config"] = build_quantization_config(
            model, shards=shard_info, recipe=None if recipe is None else recipe.to_dict())
        # config.json last: it is what makes the directory a checkpoint.
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    return Path(out)


def read_quantization_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(config_dict, quantization_config)`` of a checkpoint directory, validated."""
    path = Path(path)
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no {CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{cfg_path} is not valid JSON (truncated or corrupted?)") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} does not hold a JSON object")
    return cfg, check_quantization_config(cfg.get("quantization_config"))


def verify_shards(path: Path, qc: dict, checksums: bool = True) -> list[Path]:
    shards = qc.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise CheckpointError("quantization_config lists no shards")
    files = []
    for name, info in shards.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or not name.endswith(".safetensors"):
            raise CheckpointError(f"refusing shard name {name!r} (must be a plain .safetensors file name)")
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"shard {name} is missing")
        if p.stat().st_size != info.get("size"):
            raise CheckpointError(f"shard {name} has {p.stat().st_size} bytes, expected {info.get('size')} (truncated?)")
        if checksums and _sha256(p) != info.get("sha256"):
            raise CheckpointError(f"shard {name} fails its SHA-256 check (corrupted or tampered)")
        files.append(p)
    return files


def load_tensors_into(model: nn.Module, files: list[Path], strict: bool = True) -> None:
    """Copy tensors from safetensors shards into the model, checking names, shapes and dtypes."""
    from safetensors import safe_open
    from safetensors import SafetensorError

    expected = dict(model.state_dict(keep_vars=True))
    loaded = set()
    for p in files:
        try:
            with safe_open(p, framework="pt") as f:
                for key in f.keys():
                    if key not in expected:
                        raise CheckpointError(f"{p.name}: tensor {key} does not belong to the model")
                    target = expected[key]
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(target.shape) or t.dtype != target.dtype:
                        raise CheckpointError(f"{p.name}: tensor {key} is {t.dtype} {tuple(t.shape)}, the config "
                                              f"implies {target.dtype} {tuple(target.shape)}")
                    with torch.no_grad():
                        target.data.copy_(t) if isinstance(target, nn.Parameter) else target.copy_(t)
                    loaded.add(key)
        except SafetensorError as e:
            raise CheckpointError(f"{p.name} is not a valid safetensors file: {e}") from None
    missing = [k for k in expected if k not in loaded]
    if strict:
        # Tied tensors (lm_head ↔ embeddings) are stored once; anything else missing is an error.
        ptrs = {expected[k].data_ptr() for k in loaded}
        missing = [k for k in missing if expected[k].data_ptr() not in ptrs and not _non_persistent(model, k)]
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")


def _non_persistent(model, key) -> bool:
    mod_name, _, buf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return buf in getattr(mod, "_non_persistent_buffers_set", set())


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         verify: bool = True, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model with its compressed modules from a native checkpoint directory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    cfg_dict, qc = read_quantization_config(path)
    files = verify_shards(path, qc, checksums=verify)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    replace_modules(model, qc["modules"], dtype)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    load_tensors_into(model, files)
    if tied:
        model.tie_weights()
    model.config.quantization_config = qc
    return model.to(device).eval()
