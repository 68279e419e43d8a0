"""Finding and loading models: local HF directories, GGUF files, ``default``; decoder layers and
their target linears for any Llama / Qwen2 / Mistral / Gemma style decoder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .errors import TensorpressError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_path(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """``(directory, gguf_file_or_None)`` for a model spec; ``default`` is the protocol model."""
    if str(spec) == "default":
        from . import assets
        return assets.default_model_dir(), None
    p = Path(spec)
    try:
        is_gguf, exists = p.is_file() and p.suffix == ".gguf", p.exists()
        is_model_dir = p.is_dir() and (p / "config.json").is_file()
    except (OSError, ValueError) as e:           # a name too long for the file system, a NUL byte
        raise TensorpressError(f"model path {str(spec)[:80]!r}... is not usable: {e.__class__.__name__}") from None
    if is_gguf:
        return p.parent, p.name
    if not exists:
        raise TensorpressError(f"model {spec} does not exist (give a local HF directory, a .gguf file or 'default')")
    if not is_model_dir:
        raise TensorpressError(f"{spec} is not a model directory (no config.json)")
    try:
        json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TensorpressError(f"{p / 'config.json'} is not valid JSON") from None
    if not any(p.glob("*.safetensors")):
        raise TensorpressError(f"{spec} has no .safetensors weights (pickled .bin weights are not loaded)")
    return p, None


def is_tensorpress_checkpoint(path: Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "tensorpress"


def load_model(spec, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``(model, tokenizer)`` in eval mode. Compressed tensorpress checkpoints load compressed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model_path(spec)
    if gguf is None and is_tensorpress_checkpoint(path):
        from .checkpoint import load
        return load(path), _load_tokenizer(path, None, trust_remote_code)
    from safetensors import SafetensorError
    if gguf is None:
        cfg = json.loads((path / "config.json").read_text())        # valid JSON: resolve_model_path checked
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else "not a mapping"
        if qc is not None and not isinstance(qc, dict):
            raise TensorpressError(f"{spec}: config.json's quantization_config is not a mapping (corrupted config)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=dtype,
                                                           trust_remote_code=trust_remote_code,
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TensorpressError(f"could not load a causal LM from {spec}: {msg}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        # transformers fills missing weights with random values: never compress or evaluate those
        raise TensorpressError(f"{spec}: the weight files lack {len(missing)} tensor(s) of the architecture, "
                               f"e.g. {sorted(missing)[0]} (a tensorpress checkpoint without its quantization_config?)")
    if gguf is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), _load_tokenizer(path, gguf, trust_remote_code)


def _load_tokenizer(path, gguf, trust_remote_code):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList whose length is ``num_hidden_layers``."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.endswith("layers"):
            return mod
    raise TensorpressError(f"cannot find the decoder layers of {type(model).__name__}")


def layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise AssertionError


def target_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Compressible linears of one decoder block, by their name inside the block."""
    from .nn import CompressedLinear
    return {n: m for n, m in layer.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def linear_weight_count(model: nn.Module) -> int:
    return sum(m.in_features * m.out_features for layer in decoder_layers(model)
               for m in target_linears(layer).values())
