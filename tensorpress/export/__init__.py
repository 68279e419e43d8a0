"""Export quantised models to standard formats that load with no tensorpress code.

::

    from tensorpress.export import export
    export(model_or_native_dir, "out-gptq", "gptq")                          # GPTQ v1 (AutoGPTQ zeros)
    export(model_or_native_dir, "out-gptq2", "gptq", checkpoint_format="gptq_v2")
    export(model_or_native_dir, "out-ct", "compressed-tensors")              # pack-quantized W4A16
    export(model_or_native_dir, "out-dense", "dense")                        # plain weights, any method

``src`` is an in-memory transformers model whose linears are :class:`tensorpress.nn.QuantLinear`
(others dense), or a native tensorpress checkpoint directory (loaded with :func:`tensorpress.load`;
its tokenizer files, generation config and recipe are copied). Writes are atomic
(:func:`tensorpress.checkpoint.io.atomic_dir`). Anything a format cannot hold (low-rank corrections,
factorised linears, a quantised head, several schemes in GPTQ, act-order or ragged groups in
compressed-tensors, asymmetric GPTQ v1) raises :class:`tensorpress.errors.TensorpressError`.
Low-rank corrections of a quantised base go into a PEFT LoRA adapter beside it (``out/lora``).
``dense`` holds anything: each compressed linear becomes the dense weight it computes with
(corrections merged, pruned zeros kept), an ordinary transformers checkpoint.

This package imports torch, safetensors, json and tensorpress.nn / packing / checkpoint only.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import TensorpressError

FORMATS = ("gptq", "compressed-tensors", "dense")
_ALIASES = {"dense": "dense", "gptq": "gptq", "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors",
            "ct": "compressed-tensors"}


def export(src, out: str | os.PathLike, fmt: str, *, tokenizer=None, recipe=None, overwrite: bool = False,
           max_shard_bytes: int | None = None, adapter: bool = True, **options) -> Path:
    """Export ``src`` (model or native checkpoint dir) to ``out`` in format ``fmt``; returns ``out``.

    Options:
      * ``tokenizer`` — saved next to the model (a native source's tokenizer files are copied anyway);
      * ``recipe`` — a :class:`~tensorpress.recipe.Recipe` or dict recorded as provenance (a native
        source's recipe is used when not given);
      * ``overwrite`` — replace an existing ``out`` (atomically);
      * ``max_shard_bytes`` — shard the safetensors above this size (default 4 GiB);
      * ``adapter`` — (gptq / compressed-tensors) when the model carries low-rank corrections (EoRA, …), write the bare base in
        ``fmt`` and the corrections as a PEFT LoRA adapter in ``out/lora`` (``lora_alpha = r``):
        ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out + "/lora")``
        computes what the tensorpress model does (default ``True``; ``False`` refuses such models);
      * GPTQ only: ``checkpoint_format`` — ``"gptq"`` (v1, stored zeros ``z − 1``; the default for
        symmetric models) or ``"gptq_v2"`` (actual zeros; the default, and the only choice, for
        asymmetric ones).
    """
    from ..checkpoint.io import atomic_dir
    from ._common import resolve_source

    key = _ALIASES.get(str(fmt).lower())
    if key is None:
        raise TensorpressError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    allowed = {"checkpoint_format"} if key == "gptq" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TensorpressError(f"unknown option(s) for {key} export: {', '.join(unknown)}"
                               + (f"; valid: {', '.join(sorted(allowed))}" if allowed else ""))
    source = resolve_source(src, recipe=recipe, tokenizer=tokenizer)
    if key == "gptq":
        from .gptq import CHECKPOINT_FORMATS, export_gptq
        cf = options.get("checkpoint_format")
        if cf is not None and cf not in CHECKPOINT_FORMATS:
            raise TensorpressError(f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, got {cf!r}")
        write = lambda tmp: export_gptq(source, tmp, checkpoint_format=cf, max_shard_bytes=max_shard_bytes)  # noqa: E731
    elif key == "dense":
        from .dense import export_dense
        write = lambda tmp: export_dense(source, tmp, max_shard_bytes=max_shard_bytes)  # noqa: E731
    else:
        from .compressed_tensors import export_compressed_tensors
        write = lambda tmp: export_compressed_tensors(source, tmp, max_shard_bytes=max_shard_bytes)  # noqa: E731
    from .peft import ADAPTER_SUBDIR, corrections, corrections_detached, write_adapter
    has_lr = key != "dense" and bool(corrections(source.model))    # dense merges corrections
    if has_lr and not adapter:
        raise TensorpressError("the model carries low-rank corrections, which the base formats cannot hold; "
                               "export them as a PEFT LoRA adapter (adapter=True, CLI --adapter), or merge them first")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if has_lr:
            with corrections_detached(source.model):
                write(tmp)
            write_adapter(source.model, tmp / ADAPTER_SUBDIR, {"producer": "tensorpress", "base_format": key})
        else:
            write(tmp)
    return Path(out)


__all__ = ["FORMATS", "export"]
