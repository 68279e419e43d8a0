"""Schema of the native format: the ``quantization_config`` block and module replacement."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CheckpointError, TensorpressError
from ..nn import CompressedLinear, module_from_config

QUANT_METHOD = "tensorpress"
FORMAT_VERSION = 1


def build_quantization_config(model: nn.Module, **extra) -> dict:
    from .. import __version__
    modules = {n: m.config() for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "tensorpress_version": __version__,
            "modules": modules, **extra}


def check_quantization_config(qc) -> dict:
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError("not a tensorpress checkpoint (quantization_config.quant_method is not 'tensorpress')")
    v = qc.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {v!r} is not supported by this tensorpress "
                              f"(supports up to {FORMAT_VERSION}); upgrade tensorpress")
    if not isinstance(qc.get("modules"), dict):
        raise CheckpointError("quantization_config has no 'modules' table")
    return qc


# Integer fields of a module entry and the largest value each may take for an ``out x in`` linear. A
# hostile entry must not make the loader allocate more than the layer could ever need (rank 10**12)
# or divide by zero (group_size 0); real entries stay far below these bounds.
def _int_bounds(in_f: int, out_f: int) -> dict[str, tuple[int, int]]:
    return {"in_features": (1, 1 << 31), "out_features": (1, 1 << 31), "rank": (0, 4 * (in_f + out_f)),
            "factor_rank": (0, 4 * (in_f + out_f)), "n_channels": (0, in_f), "bits": (1, 16),
            "group_size": (-1, in_f), "block_size": (0, max(in_f, out_f)), "act_bits": (1, 16),
            "act_group_size": (-1, in_f)}


def _check_entry(name: str, cfg) -> None:
    if not isinstance(cfg, dict):
        raise CheckpointError(f"bad module entry for {name}: expected a mapping, got {type(cfg).__name__}")
    in_f, out_f = cfg.get("in_features"), cfg.get("out_features")
    for k, v in (("in_features", in_f), ("out_features", out_f)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"bad module entry for {name}: {k} must be a positive integer, got {v!r}")
    for k, (lo, hi) in _int_bounds(in_f, out_f).items():
        v = cfg.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi or (k.endswith("group_size") and v == 0):
            raise CheckpointError(f"bad module entry for {name}: {k} = {v!r} is out of range for a "
                                  f"{out_f}x{in_f} linear")
    for k in ("bias", "sym", "g_idx"):
        if k in cfg and not isinstance(cfg[k], bool):
            raise CheckpointError(f"bad module entry for {name}: {k} must be true or false, got {cfg[k]!r}")


def replace_modules(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype | None = None) -> None:
    """Swap the linears named in ``modules`` for empty compressed modules of the recorded format.

    The table may come from a hostile ``config.json``: a name that is not a linear of the
    architecture, an entry of the wrong shape or with absurd sizes is a :class:`CheckpointError`."""
    for name, cfg in modules.items():
        if not isinstance(name, str) or not name or any(not part for part in name.split(".")):
            raise CheckpointError(f"config names module {name!r}, which is not a module name")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError:
            raise CheckpointError(f"config names module {name}, which the model does not have") from None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"config names module {name}, which is a {type(old).__name__}, not a linear layer "
                                  f"of the architecture")
        _check_entry(name, cfg)
        d = dtype
        if d is None:
            w = getattr(old, "weight", None)
            d = w.dtype if w is not None and w.is_floating_point() else torch.float32
        if (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise CheckpointError(f"module {name}: config shape does not match the model architecture")
        try:
            new = module_from_config(cfg, d)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError, AssertionError,
                TensorpressError) as e:
            raise CheckpointError(f"bad module entry for {name}: {type(e).__name__}: {e}") from None
        if (old.in_features, old.out_features) != (new.in_features, new.out_features):
            raise CheckpointError(f"module {name}: config shape does not match the model architecture")
        setattr(parent, child, new)
