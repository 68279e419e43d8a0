"""Finding and loading models: local HF directories, GGUF files, ``default``; decoder layers and
their target linears for any Llama / Qwen2 / Mistral / Gemma style decoder; which norm feeds which
linears in the decoder layers whose forward is known exactly (:func:`norm_readers`, for folding
per-channel input scales into the norm: :func:`scaled_norm_weight`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


# --- which norm feeds which linears (folding per-channel input scales into the norm) --------------

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

# family -> (transformers.models.<module>, class-name stem of its DecoderLayer / Attention / MLP / RMSNorm,
#            unit offset, {norm: the linears that read its output})
# Llama / Qwen2 / Mistral: ``h = x + attn(input_layernorm(x)); h + mlp(post_attention_layernorm(h))`` with
# ``RMSNorm(x) = w · n(x)``. Gemma 3: ``h = x + post_attention_layernorm(attn(input_layernorm(x)));
# h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`` with ``RMSNorm(x) = (1 + w) · n(x)``
# (``n(x) = x / sqrt(mean(x²) + eps)``; checked against transformers 5.x).
_NORM_LAYOUTS = {
    "llama": ("llama", "Llama", False, {"input_layernorm": _QKV, "post_attention_layernorm": _GATE_UP}),
    "qwen2": ("qwen2", "Qwen2", False, {"input_layernorm": _QKV, "post_attention_layernorm": _GATE_UP}),
    "mistral": ("mistral", "Mistral", False, {"input_layernorm": _QKV, "post_attention_layernorm": _GATE_UP}),
    "gemma3": ("gemma3", "Gemma3", True, {"input_layernorm": _QKV, "pre_feedforward_layernorm": _GATE_UP}),
}

# A folded norm weight must reproduce the scaled multiplier to this relative error (per channel) or
# better: ``max(NORM_FOLD_RTOL, 4 · eps(weight dtype))``. Llama-style ``w / s`` always does (one
# rounding); Gemma's ``(1 + w')`` cannot represent a multiplier much smaller than 1 precisely
# (``w'`` near −1 keeps the absolute precision of numbers near 1).
NORM_FOLD_RTOL = 1e-5


@dataclass(frozen=True)
class NormReaders:
    """A norm of a decoder block and every linear that reads its output (names inside the block)."""
    norm: str
    linears: tuple[str, ...]
    unit_offset: bool              # True: the norm computes ``(1 + w) · n(x)`` (Gemma), else ``w · n(x)``


def _layout_classes(family: str):
    import importlib
    mod_name, stem, offset, readers = _NORM_LAYOUTS[family]
    try:
        mod = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
        layer, attn, mlp, norm = (getattr(mod, f"{stem}{k}") for k in ("DecoderLayer", "Attention", "MLP", "RMSNorm"))
    except (ImportError, AttributeError):
        return None
    return layer, attn, mlp, norm, offset, readers


def norm_readers(layer: nn.Module) -> list[NormReaders]:
    """The norms of decoder block ``layer`` whose output only the listed linears read, for the decoder
    layers whose forward is known exactly (Llama / Qwen2 / Mistral / Gemma 3 of transformers: the
    layer, attention, MLP and norm classes must be exactly those, not subclasses). ``[]`` for
    anything else: callers then keep per-channel scales in the linears. ``o_proj`` and ``down_proj``
    never appear (no norm precedes them)."""
    for family in _NORM_LAYOUTS:
        classes = _layout_classes(family)
        if classes is None or type(layer) is not classes[0]:
            continue
        _, attn, mlp, norm_cls, offset, readers = classes
        if type(getattr(layer, "self_attn", None)) is not attn or type(getattr(layer, "mlp", None)) is not mlp:
            return []
        out = []
        for norm_name, linears in readers.items():
            norm = getattr(layer, norm_name, None)
            if type(norm) is not norm_cls or not isinstance(getattr(norm, "weight", None), torch.Tensor):
                continue
            try:
                mods = [layer.get_submodule(n) for n in linears]
            except AttributeError:
                continue
            if all(getattr(m, "in_features", None) == norm.weight.shape[-1] for m in mods) and norm.weight.dim() == 1:
                out.append(NormReaders(norm_name, linears, offset))
        return out
    return []


def scaled_norm_weight(weight: torch.Tensor, unit_offset: bool, scale: torch.Tensor) -> torch.Tensor | None:
    """The norm weight (same dtype) whose norm output is the current one times ``scale [hidden]`` per
    channel: ``w · s`` (``w · n(x)`` norms) or ``(1 + w) · s − 1`` (Gemma's ``(1 + w) · n(x)``).
    ``None`` when the weight dtype cannot hold it within ``max(NORM_FOLD_RTOL, 4 eps)`` relative
    per channel (or it is not finite): then the scale must stay where it is."""
    w, s = weight.detach().double(), scale.detach().double().to(weight.device)
    mult = ((1 + w) if unit_offset else w) * s
    new = (mult - 1 if unit_offset else mult).to(weight.dtype)
    got = (1.0 + new.float()).double() if unit_offset else new.double()    # what the norm multiplies by (fp32)
    if not (bool(torch.isfinite(new).all()) and bool(torch.isfinite(mult).all())):
        return None
    tol = max(NORM_FOLD_RTOL, 4 * torch.finfo(weight.dtype).eps)
    err = (got - mult).abs() / mult.abs()
    ok = torch.where(mult == 0, got == 0, err <= tol)
    return new if bool(ok.all()) else None
