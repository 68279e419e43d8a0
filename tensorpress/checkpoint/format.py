"""Schema of the native format: the ``quantization_config`` block and module replacement."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CheckpointError
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


def replace_modules(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype | None = None) -> None:
    """Swap the linears named in ``modules`` for empty compressed modules of the recorded format."""
    for name, cfg in modules.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError:
            raise CheckpointError(f"config names module {name}, which the model does not have") from None
        d = dtype
        if d is None:
            w = getattr(old, "weight", None)
            d = w.dtype if w is not None and w.is_floating_point() else torch.float32
        try:
            new = module_from_config(cfg, d)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"bad module entry for {name}: {e}") from None
        if (getattr(old, "in_features", new.in_features), getattr(old, "out_features", new.out_features)) != (
                new.in_features, new.out_features):
            raise CheckpointError(f"module {name}: config shape does not match the model architecture")
        setattr(parent, child, new)
