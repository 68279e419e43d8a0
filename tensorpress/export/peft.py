"""Low-rank corrections as a standard PEFT LoRA adapter (interop.md §7).

The de-facto interop rule for "quantised + low-rank": the base in a standard format (GPTQ or
compressed-tensors) plus a PEFT adapter holding the correction, so that transformers + PEFT (and
vLLM's LoRA, GPTQModel's ``Lora``) load both with no tensorpress code:

* ``adapter_config.json`` — ``peft_type: LORA``, ``r`` = the most common rank, ``lora_alpha = r``
  (PEFT's scaling ``alpha / r`` is then 1: the adapter adds exactly ``x Aᵀ Bᵀ``), per-module ranks
  in ``rank_pattern`` with equal ``alpha_pattern``; ``target_modules`` are short names
  (``q_proj``…) when every such module carries a correction, else the full module names;
* ``adapter_model.safetensors`` — ``base_model.model.<module>.lora_A.weight [r, in]`` (the down
  factor) and ``…lora_B.weight [out, r]`` (the up factor), in the factors' stored dtype.
"""
from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import TensorpressError
from ..nn import CompressedLinear, LowRankLinear

ADAPTER_SUBDIR = "lora"


def corrections(model: nn.Module) -> dict[str, CompressedLinear]:
    """Modules carrying a low-rank correction, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear) and m.rank > 0}


def adapter_files(model: nn.Module, base_name: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of the PEFT LoRA adapter for the model's corrections."""
    mods = corrections(model)
    if not mods:
        raise TensorpressError("the model has no low-rank correction to export as an adapter")
    for n, m in mods.items():
        if isinstance(m, LowRankLinear):
            raise TensorpressError(f"{n} is a factorised linear: its base has no standard format to carry "
                                   f"a PEFT adapter")
    ranks = {n: m.rank for n, m in mods.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    short = {n.rsplit(".", 1)[-1] for n in mods}
    all_of = {s: [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == s and isinstance(m, nn.Module)
                  and hasattr(m, "in_features")] for s in short}
    if all(set(all_of[s]) <= set(mods) for s in short):
        targets = sorted(short)
    else:
        targets = sorted(mods)
    pattern = {n: k for n, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "target_modules": targets, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_name,
    }
    tensors = {}
    for n, m in mods.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.lr_down.detach().contiguous().cpu()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.lr_up.detach().contiguous().cpu()
    return config, tensors


def write_adapter(model: nn.Module, directory: Path, metadata: dict[str, str] | None = None,
                  base_name: str | None = None) -> None:
    """Write the adapter into ``directory`` (which must exist; the caller makes it atomic)."""
    from safetensors.torch import save_file
    config, tensors = adapter_files(model, base_name)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors",
              metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextmanager
def corrections_detached(model: nn.Module):
    """Temporarily remove every correction (the base exporters see the bare base), then restore."""
    saved = {n: (m, m.lr_down, m.lr_up) for n, m in corrections(model).items()}
    try:
        for m, _, _ in saved.values():
            m.lr_down = m.lr_up = None
        yield saved
    finally:
        for m, d, u in saved.values():
            m.lr_down, m.lr_up = d, u
