"""Dense export: every compressed linear materialised as a plain ``nn.Linear`` weight.

The result is an ordinary transformers checkpoint (no ``quantization_config``) that any engine loads:
what the compressed model computes, at the model dtype, with none of its storage savings. It is the
way out for formats no engine serves yet (2:4 + ARMOR wrappers, LOST, factorised SVD linears, masks),
and for checking a compressed model with tools that only read dense weights. Sparsity survives as
zeros (a pruned linear stays exactly N:M in the dense weight); low-rank corrections are merged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..nn import CompressedLinear
from ._common import Source, check_tied_head, config_dict, dense_state, inventory_dense, provenance, write_checkpoint


def dense_tensors(m: CompressedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight`` (and ``bias``) of one compressed linear as ``nn.Linear`` holds them."""
    t = {"weight": m.effective_weight().detach().to(dtype).contiguous().cpu()}
    if m.bias is not None:
        t["bias"] = m.bias.detach().to(dtype).contiguous().cpu()
    return t


def export_dense(src: Source, tmp: Path, max_shard_bytes: int | None = None) -> dict:
    """Write a plain transformers checkpoint of ``src`` into ``tmp``; returns the provenance block."""
    model = src.model
    dtype = src.dtype
    inv = inventory_dense(model)
    tensors = dense_state(model, inv, dtype)
    for name, m in inv.compressed.items():
        for k, v in dense_tensors(m, dtype).items():
            tensors[f"{name}.{k}"] = v
    check_tied_head(model, tensors, inv)
    prov = provenance(src, "dense", compressed_formats=sorted({m.FORMAT for m in inv.compressed.values()}))
    cfg = config_dict(src, {})
    cfg.pop("quantization_config")
    metadata = {"producer": f"tensorpress {prov['version']}", "tensorpress_export": "dense",
                "tensorpress_provenance": json.dumps(prov, sort_keys=True, default=str)}
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    write_checkpoint(tmp, src, tensors, cfg, metadata, **kw)
    return prov
