"""Atomic save and verified, strict load of native checkpoints.

Save writes everything into a hidden temporary directory next to the target, fsyncs it and renames
it into place, so a crash never leaves a directory at the target path. Load checks, before reading
any tensor: shard names (no paths), sizes and SHA-256 sums against the config, then every tensor's
name, shape and dtype against the module table; pickles are never read.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .format import QUANT_METHOD, build_quantization_config, check_quantization_config, replace_modules

MAX_SHARD_BYTES = 2 * 1024**3
CONFIG = "config.json"
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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


def _unique_state(model: nn.Module, names=None) -> dict[str, torch.Tensor]:
    """State dict with storage-shared (tied) tensors kept once, under their first name; only the
    entries in ``names`` when given (the others are not touched: they may live on ``meta``)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if names is not None and k not in names:
            continue
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


# Hidden siblings of a target ``out``: ``.<out.name>.partial-<host>-<pid>-<token>`` (being written)
# and ``.<out.name>.old-<host>-<pid>-<token>`` (the previous checkpoint during a non-atomic overwrite).
# Host, pid and a per-process token say who owns one, so that a later save can remove those whose
# writer is dead without touching live writers (other processes, other threads of this one, other
# hosts on a shared file system).
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-"
                      r"(?P<token>[0-9a-f]+)x\d+$")
_TOKEN = secrets.token_hex(4)
_COUNTER = itertools.count()


def _host() -> str:
    """This host and PID namespace (containers sharing a directory and a host name have their own
    pids: a pid alive in one may be unknown in another), as one file-name-safe word."""
    try:
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        ns = ""
    return re.sub(r"[^A-Za-z0-9_.]", "_", f"{socket.gethostname()}.{ns}" if ns else socket.gethostname()) or "host"


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{_host()}-{os.getpid()}-{_TOKEN}x{next(_COUNTER)}"


def _writer_alive(pid: int, token: str) -> bool:
    if pid == os.getpid():
        # This process (maybe another thread), or an earlier one that had our pid (containers
        # restart with the same small pids): the token tells them apart.
        return token == _TOKEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:             # EPERM: alive, owned by someone else
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


def clean_stale_siblings(out: Path, restore: bool = False) -> list[Path]:
    """Deal with what killed saves left in ``out``'s parent (only leftovers of dead writers on this
    host: live processes and other hosts of a shared file system are never touched):

    * temporary directories (``.partial``) of any target are removed;
    * a previous checkpoint of another target (``.old``) is removed once that target exists again;
    * a previous checkpoint of ``out`` itself is removed if ``out`` exists; if ``out`` is missing
      (an overwrite was killed between its two renames) it is renamed back to ``out`` when
      ``restore`` (this save overwrites anyway, atomically), else kept and returned, for the caller
      to remove once the new checkpoint is in place: no kill can then lose both.
    """
    try:
        entries = sorted(out.parent.iterdir(), key=lambda p: p.lstat().st_mtime, reverse=True)
    except OSError:
        return []
    host, kept = _host(), []
    for p in entries:
        m = _SIBLING.match(p.name)
        if m is None or m["host"] != host or _writer_alive(int(m["pid"]), m["token"]):
            continue
        if m["kind"] == "partial":
            _remove(p)
        elif m["name"] != out.name:
            if (out.parent / m["name"]).exists():
                _remove(p)
        elif out.exists() or out.is_symlink():
            _remove(p)
        elif restore and (p / CONFIG).is_file():
            try:
                os.replace(p, out)      # undo the first rename of the killed overwrite (newest first)
                _fsync_dir(out.parent)
            except OSError:
                kept.append(p)
        else:
            kept.append(p)
    return kept


_RENAME_EXCHANGE = 2        # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``). ``False`` when the
    platform or file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {b} into place: {os.strerror(err)}")


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a hidden temporary directory; on success fsync it and rename it to ``out``.

    On any exception (or a kill) ``out`` is untouched: no half-written directory ever sits there.
    With ``overwrite``, the new directory is swapped with the old one in a single atomic
    ``renameat2(RENAME_EXCHANGE)`` where the platform has it, so ``out`` always holds a complete
    checkpoint, old or new. Elsewhere the old one is first renamed to a hidden ``.old`` sibling: a kill
    between the two renames leaves no ``out`` (never a partial one), the previous checkpoint in that
    sibling, and :func:`read_quantization_config` says where it is; the next overwrite of ``out``
    renames it back first. Leftovers of killed saves are removed by the next save into the same
    directory (:func:`clean_stale_siblings`).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output path {out} already exists (choose another or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = clean_stale_siblings(out, restore=overwrite)
    tmp = _sibling(out, "partial")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if out.exists() or out.is_symlink():
            if _exchange(tmp, out):
                _fsync_dir(out.parent)      # tmp now holds the previous contents: removed below
            else:
                old = _sibling(out, "old")
                _remove(old)
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)    # an error (not a kill) between the renames: put it back
                    raise
                _fsync_dir(out.parent)
                _remove(old)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
        for p in stale:                     # superseded copies of an earlier killed overwrite
            _remove(p)
    finally:
        _remove(tmp)


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
    try:
        is_file = cfg_path.is_file()
    except (OSError, ValueError) as e:      # a name too long, a NUL, ...
        raise CheckpointError(f"{str(path)[:200]!r} is not a checkpoint path: {getattr(e, 'strerror', None) or e}") from None
    if not is_file:
        hint = ""
        if not path.exists():
            olds = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*/{CONFIG}")) if path.name else []
            if olds:
                hint = (f"; an interrupted overwrite left the previous checkpoint in {olds[-1].parent} "
                        f"(rename it back to {path.name})")
        raise CheckpointError(f"{path} is not a checkpoint (no {CONFIG}){hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{cfg_path} is not valid JSON (truncated or corrupted?)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} does not hold a JSON object")
    return cfg, check_quantization_config(cfg.get("quantization_config"))


def verify_shards(path: Path, qc: dict, checksums: bool = True) -> list[Path]:
    shards = qc.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise CheckpointError("quantization_config lists no shards")
    files = []
    for name, info in shards.items():
        # A plain file name in the checkpoint directory: no separators, no "..", no absolute path, no
        # hidden file, no NUL, and never a pickle (.bin/.pt): only safetensors are read.
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or Path(name).name != name:
            raise CheckpointError(f"refusing shard name {name!r} (must be a plain .safetensors file name)")
        if not isinstance(info, dict) or isinstance(info.get("size"), bool) or not isinstance(info.get("size"), int) \
                or (checksums and not isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"quantization_config.shards[{name!r}] must give an integer size and a sha256 string")
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
                    if key in loaded:
                        raise CheckpointError(f"{p.name}: tensor {key} is stored in more than one shard")
                    target = expected[key]
                    # Header first: a shape or dtype the config does not imply is refused before the
                    # tensor is read.
                    sl = f.get_slice(key)
                    shape, dt = tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype())
                    if shape != tuple(target.shape) or dt != target.dtype:
                        raise CheckpointError(f"{p.name}: tensor {key} is {dt or sl.get_dtype()} {shape}, the config "
                                              f"implies {target.dtype} {tuple(target.shape)}")
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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


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
    # The architecture comes from config.json, which may be hostile: whatever transformers raises for
    # an unknown model type, remote code it is not allowed to run or nonsense sizes is one clear error.
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (transformers raises ValueError, KeyError, TypeError, OSError, ...)
        raise CheckpointError(f"{path / CONFIG} does not describe a model transformers can build: "
                              f"{type(e).__name__}: {_first_line(e)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path / CONFIG}: unsupported dtype {dtype!r} (one of {', '.join(_DTYPES)})")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{path / CONFIG}: unsupported dtype {dtype!r}")
    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot build the model described by {path / CONFIG}: "
                              f"{type(e).__name__}: {_first_line(e)}") from None
    replace_modules(model, qc["modules"], dtype)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    load_tensors_into(model, files)
    if tied:
        model.tie_weights()
    model.config.quantization_config = qc
    return model.to(device).eval()
