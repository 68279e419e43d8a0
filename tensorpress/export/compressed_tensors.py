"""compressed-tensors ``pack-quantized`` export (interop.md §5): W4A16 (any 2–8 bits) for vLLM and
transformers with compressed-tensors installed.

Per quantised linear ``<p>``: ``weight_packed int32 [out, ceil(in·b/32)]`` (codes offset by
``2**(b−1)``, i.e. our unsigned codes, packed LSB-first along the input), ``weight_scale [out, G]``
in the model dtype, ``weight_shape int64 [2]``, ``weight_zero_point int32 [ceil(out·b/32), G]``
(packed along the output, asymmetric only), optional ``bias``.

Each distinct ``(bits, group_size, sym)`` becomes one config group (targets ``["Linear"]`` when there is
only one, else the module names). Unquantised linears and the head go to ``ignore``. Not representable
with the compressed-tensors release tested here (0.19): act-order ``g_idx`` (``actorder: "group"`` was
removed) and a ragged last group (``in_features`` not a multiple of the group size).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import TensorpressError
from ..nn import QuantLinear
from ..packing import pack_bits, unpack_bits
from ._common import (Source, check_tied_head, config_dict, dense_state, has_act_order, inventory,
                      module_scheme, provenance, write_checkpoint)

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def ct_tensors(m: QuantLinear, dtype: torch.dtype, name: str = "module") -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one module (keys without the module prefix)."""
    if has_act_order(m):
        raise TensorpressError(
            f"{name} uses act-order groups (g_idx); compressed-tensors >= 0.19 removed actorder='group', so "
            f"this cannot be exported as compressed-tensors — re-compress with static_groups: true or export GPTQ")
    in_f, out_f, bits = m.in_features, m.out_features, m.bits
    if m.group_size != -1 and in_f % m.group_size:
        raise TensorpressError(
            f"{name}: in_features {in_f} is not a multiple of group_size {m.group_size}; compressed-tensors "
            f"rejects a ragged last group — use a group size dividing {in_f}, or export GPTQ")
    codes = unpack_bits(m.qweight, bits, in_f, dim=0).t()                 # [out, in], unsigned
    zeros = unpack_bits(m.qzeros, bits, out_f, dim=1).t().contiguous()     # [out, G], unsigned
    if m.sym and not bool((zeros == 2 ** (bits - 1)).all()):
        raise TensorpressError(f"{name} is marked symmetric but its zero points are not {2 ** (bits - 1)}; "
                               f"the checkpoint is inconsistent")
    scale_dtype = dtype if dtype in _SCALE_DTYPES else torch.float16
    t = {
        # compressed-tensors packs signed codes + 2**(b-1), i.e. exactly our unsigned codes.
        "weight_packed": pack_bits(codes, bits, dim=1),
        "weight_scale": m.scales.detach().t().to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not m.sym:
        t["weight_zero_point"] = pack_bits(zeros, bits, dim=0)
    if m.bias is not None:
        t["bias"] = m.bias.detach().to(dtype).contiguous()
    return {k: v.cpu() for k, v in t.items()}


def read_ct_tensors(t: dict[str, torch.Tensor], bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Inverse view: ``(signed codes [out, in], signed zero points [out, G] or None, scale [out, G])``."""
    out_f, in_f = (int(x) for x in t["weight_shape"].tolist())
    off = 2 ** (bits - 1)
    q = unpack_bits(t["weight_packed"], bits, in_f, dim=1) - off
    zp = None
    if "weight_zero_point" in t:
        zp = unpack_bits(t["weight_zero_point"], bits, out_f, dim=0) - off
    return q, zp, t["weight_scale"].float()


def dequantize_ct(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Dense fp32 ``W [out, in]`` from compressed-tensors tensors, as compressed-tensors computes it."""
    q, zp, s = read_ct_tensors(t, bits)
    g = q.shape[1] // s.shape[1]
    gi = torch.arange(q.shape[1]) // g
    z = torch.zeros_like(s) if zp is None else zp.float()
    return s[:, gi] * (q.float() - z[:, gi])


def _weights_args(bits: int, group_size: int, sym: bool) -> dict:
    return {
        "num_bits": bits, "type": "int", "symmetric": sym,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "block_structure": None, "dynamic": False, "actorder": None,
        "scale_dtype": None, "zp_dtype": None if sym else "torch.int8",
        "observer": None, "observer_kwargs": {},
    }


def export_compressed_tensors(src: Source, tmp: Path, max_shard_bytes: int | None = None) -> dict:
    """Write a compressed-tensors pack-quantized checkpoint of ``src`` into ``tmp``."""
    model = src.model
    inv = inventory(model, "compressed-tensors")
    dtype = src.dtype
    tensors = dense_state(model, inv, dtype)
    check_tied_head(model, tensors, inv)
    groups: dict[tuple, list[str]] = {}
    for name, m in inv.compressed.items():
        for k, v in ct_tensors(m, dtype, name).items():
            tensors[f"{name}.{k}"] = v
        groups.setdefault(module_scheme(m), []).append(name)

    single = len(groups) == 1
    config_groups = {
        f"group_{i}": {"targets": ["Linear"] if single else names,
                       "weights": _weights_args(*scheme),
                       "input_activations": None, "output_activations": None, "format": None}
        for i, (scheme, names) in enumerate(groups.items())}
    ignore = ([inv.lm_head] if inv.lm_head else []) + (inv.dense_linears if single else [])
    prov = provenance(src, "compressed-tensors",
                      tested_with={"compressed-tensors": "0.19.0", "transformers": "5.17.0"})
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "tensorpress": prov,
    }
    metadata = {"producer": f"tensorpress {prov['version']}", "tensorpress_export": "compressed-tensors"}
    if src.recipe is not None:
        metadata["tensorpress_recipe"] = json.dumps(src.recipe, sort_keys=True, default=str)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    write_checkpoint(tmp, src, tensors, config_dict(src, qc), metadata, **kw)
    return qc
