"""Shared pieces of the exporters: source resolution, module inventory, dense tensors, file writing.

Light on purpose: torch, safetensors, json and tensorpress.nn / packing / checkpoint only.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import TensorpressError
from ..nn import CompressedLinear, DenseLinear, LowRankLinear, QuantLinear
from ..nn.modules import SVDQuantLinear

# Files copied verbatim from a native source checkpoint (tokenizer, generation config, provenance).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
             "chat_template.json", "generation_config.json", "tensorpress-recipe.yaml")
RECIPE_FILE = "tensorpress-recipe.yaml"
MAX_SHARD_BYTES = 4 * 1024**3


@dataclass
class Source:
    """What an exporter works from."""
    model: nn.Module
    src_dir: Path | None = None           # native checkpoint directory, when exported from disk
    recipe: dict | None = None            # the compression recipe, when known (provenance)
    tokenizer: object = None

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: that of the input embeddings (what the weights really are), else the config's."""
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        w = getattr(emb, "weight", None) if emb is not None else None
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            return w.dtype
        d = getattr(self.model.config, "dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


def _recipe_dict(recipe) -> dict | None:
    if recipe is None:
        return None
    if isinstance(recipe, dict):
        return recipe
    if hasattr(recipe, "to_dict"):
        return recipe.to_dict()
    raise TensorpressError(f"recipe must be a Recipe or a dict, got {type(recipe).__name__}")


def resolve_source(src, recipe=None, tokenizer=None) -> Source:
    """``src`` is a model with compressed modules or a native checkpoint directory."""
    if isinstance(src, (str, os.PathLike)):
        from ..checkpoint import load
        path = Path(src)
        try:
            is_dir = path.is_dir()
        except (OSError, ValueError):            # a name too long for the file system, a NUL byte
            is_dir = False
        if not is_dir:
            raise TensorpressError(f"export source {path} is not a directory (expected a tensorpress checkpoint)")
        model = load(path)
        qc = getattr(model.config, "quantization_config", None)
        rec = _recipe_dict(recipe)
        if rec is None and isinstance(qc, dict) and isinstance(qc.get("recipe"), dict):
            rec = qc["recipe"]
        if rec is None and (path / RECIPE_FILE).is_file():
            try:
                import yaml
                rec = yaml.safe_load((path / RECIPE_FILE).read_text())
            except Exception:       # provenance only: never fail an export on it
                rec = None
        return Source(model, path, rec, tokenizer)
    if isinstance(src, nn.Module):
        if not hasattr(src, "config"):
            raise TensorpressError("export needs a transformers model (with a .config) or a checkpoint path")
        rec = _recipe_dict(recipe)
        qc = getattr(src.config, "quantization_config", None)
        if rec is None and isinstance(qc, dict) and isinstance(qc.get("recipe"), dict):
            rec = qc["recipe"]
        return Source(src, None, rec, tokenizer)
    raise TensorpressError(f"cannot export a {type(src).__name__}: pass a model or a checkpoint directory")


@dataclass
class Inventory:
    # The compressed linears the exporter converts itself: the QuantLinears for GPTQ / compressed-tensors,
    # every CompressedLinear (low-rank, pruned, ... and the head) for the dense export.
    compressed: dict[str, CompressedLinear] = field(default_factory=dict)
    dense_linears: list[str] = field(default_factory=list)   # decoder linears left unquantised
    lm_head: str | None = None


def _output_embedding_name(model: nn.Module) -> str | None:
    if not hasattr(model, "get_output_embeddings"):
        return None
    out = model.get_output_embeddings()
    if out is None:
        return None
    for n, m in model.named_modules():
        if m is out:
            return n
    return None


def inventory(model: nn.Module, fmt: str) -> Inventory:
    """Classify the linears; raise a one-line error for anything the standard formats cannot hold."""
    inv = Inventory(lm_head=_output_embedding_name(model))
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            raise TensorpressError(
                f"{name} is a low-rank factorised linear (rank {m.factor_rank}); the {fmt} format cannot hold "
                f"it — export it with format 'dense' (plain weights) instead")
        if isinstance(m, SVDQuantLinear) and (m.act_bits != 16 or not m.smoothing_is_identity()):
            # Its GPTQ tensors hold the residual of the *smoothed* weight (and A4/A8 quantise the
            # activations): written as a plain GPTQ weight it would compute something else.
            raise TensorpressError(
                f"{name} is an SVDQuant W{m.bits}A{m.act_bits} linear"
                f"{' with a smoothing vector' if not m.smoothing_is_identity() else ''}; {fmt} can hold only the "
                f"weight-only form without smoothing (act_bits 16, smooth: false) — use the native format or "
                f"export dense")
        if isinstance(m, CompressedLinear) and m.rank > 0:
            raise TensorpressError(
                f"{name} carries a rank-{m.rank} low-rank correction, which the {fmt} format cannot hold "
                f"(export the correction as a PEFT adapter, or merge it before exporting)")
        if isinstance(m, QuantLinear):
            if name == inv.lm_head:
                raise TensorpressError(f"{name} (the output head) is quantised; {fmt} export keeps the head dense "
                                       f"(lm_head: false) — leave it out of the recipe's targets")
            if m.bits not in range(2, 9):
                raise TensorpressError(f"{name}: {m.bits}-bit weights are not representable in {fmt}")
            inv.compressed[name] = m
        elif isinstance(m, CompressedLinear) and not isinstance(m, DenseLinear):
            raise TensorpressError(f"{name}: compressed module {type(m).__name__} has no {fmt} representation "
                                   f"(format 'dense' writes it as plain weights)")
        elif isinstance(m, (nn.Linear, DenseLinear)) and name != inv.lm_head:
            inv.dense_linears.append(name)
    if not inv.compressed:
        raise TensorpressError(f"the model has no quantised linear (QuantLinear) to export as {fmt}; "
                               f"compress it with a gptq/rtn stage first")
    return inv


def inventory_dense(model: nn.Module) -> Inventory:
    """For the dense export: every compressed linear (any format, head included) is materialised."""
    inv = Inventory(lm_head=_output_embedding_name(model))
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            inv.compressed[name] = m
    if not inv.compressed:
        raise TensorpressError("the model has no compressed linear; it is dense already (save_pretrained it)")
    return inv


def dense_state(model: nn.Module, inv: Inventory, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor outside ``inv.compressed``, as transformers names it; tied copies kept once.

    ``DenseLinear`` weights (pruned layers) are cast to the model dtype; other tensors keep theirs.
    """
    compressed_prefixes = tuple(n + "." for n in inv.compressed)
    dense_mods = {n for n, m in model.named_modules() if isinstance(m, DenseLinear)}
    seen: set = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith(compressed_prefixes):
            continue
        mod, _, leaf = k.rpartition(".")
        if mod in dense_mods and leaf not in ("weight", "bias"):
            continue
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:     # tied lm_head <-> embeddings: transformers re-ties at load
            continue
        if key is not None:
            seen.add(key)
        v = v.detach()
        if mod in dense_mods and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    return out


def tied(model: nn.Module) -> bool:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(cfg, "tie_word_embeddings", False))


def check_tied_head(model: nn.Module, state: dict[str, torch.Tensor], inv: Inventory) -> None:
    """A tied head is written once (under the embedding name); an untied one must be in ``state``."""
    if inv.lm_head is None:
        return
    key = f"{inv.lm_head}.weight"
    if not tied(model) and key not in state:
        raise TensorpressError(f"{key} shares storage with another tensor but the config does not tie word "
                               f"embeddings; untie them (clone the head) or set tie_word_embeddings=True")
    if tied(model) and key in state:
        emb = model.get_input_embeddings().weight
        if state[key].shape != emb.shape or not torch.equal(state[key], emb.detach().cpu()):
            raise TensorpressError(f"the config ties word embeddings but {key} differs from the input embeddings "
                                   f"(a loader would re-tie and drop it); set tie_word_embeddings=False")
        del state[key]


def config_dict(src: Source, quantization_config: dict) -> dict:
    cfg = src.model.config.to_dict()
    cfg.pop("quantization_config", None)
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(src.model).__name__]
    cfg["dtype"] = str(src.dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    cfg["quantization_config"] = quantization_config
    return cfg


def provenance(src: Source, fmt: str, **extra) -> dict:
    """The provenance block (interop.md §9) written into the quantization config."""
    from .. import __version__
    p = {"tool": "tensorpress", "version": __version__, "export_format": fmt, **extra}
    try:
        import transformers
        p["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    if src.recipe is not None:
        p["recipe"] = src.recipe
    return p


def write_checkpoint(tmp: Path, src: Source, tensors: dict[str, torch.Tensor], config: dict,
                     metadata: dict[str, str], extra_json: dict[str, dict] | None = None,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write shards (+ index), aux files, extra JSON files and config.json into ``tmp``."""
    from ..checkpoint.io import write_shards

    meta = {"format": "pt", **{k: str(v) for k, v in metadata.items()}}
    write_shards(tmp, {k: tensors[k] for k in sorted(tensors)}, meta, max_shard_bytes)

    copied = set()
    if src.src_dir is not None:
        for fname in AUX_FILES:
            p = src.src_dir / fname
            if p.is_file():
                shutil.copy2(p, tmp / fname)
                copied.add(fname)
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(tmp)
    if "generation_config.json" not in copied:
        gen = getattr(src.model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except (ValueError, OSError):
                pass
    if RECIPE_FILE not in copied and src.recipe is not None:
        try:
            import yaml
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(src.recipe, sort_keys=False))
        except ImportError:
            pass
    for fname, obj in (extra_json or {}).items():
        (tmp / fname).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def module_scheme(m: QuantLinear) -> tuple[int, int, bool]:
    return (m.bits, m.group_size, m.sym)


def contiguous_g_idx(m: QuantLinear) -> torch.Tensor:
    """The group index of every input column: the module's ``g_idx`` or ``k // group_size``."""
    if m.g_idx is not None:
        return m.g_idx.to(torch.int32)
    g = m.in_features if m.group_size == -1 else m.group_size
    return (torch.arange(m.in_features) // g).to(torch.int32)


def has_act_order(m: QuantLinear) -> bool:
    """True when the module's groups are permuted (``g_idx`` not equal to ``k // group_size``)."""
    if m.g_idx is None:
        return False
    g = m.in_features if m.group_size == -1 else m.group_size
    return not torch.equal(m.g_idx.long(), torch.arange(m.in_features) // g)
