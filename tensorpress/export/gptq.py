"""GPTQ export (interop.md §4): loadable by GPTQModel, transformers (+optimum/gptqmodel) and vLLM.

Per quantised linear ``<p>``: ``qweight int32 [in·b/32, out]`` (packed along the input),
``qzeros int32 [G, out·b/32]`` (packed along the output), ``scales fp16 [G, out]``,
``g_idx int32 [in]``, optional ``bias``. ``checkpoint_format`` says how the zeros are stored:

* ``"gptq"`` (v1, AutoGPTQ convention, the default): each stored zero is ``z − 1``;
* ``"gptq_v2"`` (GPTQModel): the actual zero ``z``.

Symmetric modules use the standard zero ``2**(bits−1)``. Refused: a ragged last group (GPTQModel's CPU
kernel and vLLM's Marlin fail on it at run time) and 3-bit layers whose dimensions are not multiples of 32. Asymmetric modules need ``gptq_v2``: in v1 a
zero of 0 has no encoding and GPTQModel refuses ``sym: false`` v1 checkpoints it did not write.
Everything except the quantised linears is written dense (the head too: ``lm_head: false``).
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ..errors import TensorpressError
from ..nn import QuantLinear
from ..packing import pack_bits, unpack_bits
from ._common import (Source, check_tied_head, config_dict, contiguous_g_idx, dense_state, has_act_order,
                      inventory, module_scheme, provenance, write_checkpoint)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def gptq_tensors(m: QuantLinear, checkpoint_format: str, dtype: torch.dtype, name: str = "module"
                 ) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one module (keys without the module prefix)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise TensorpressError(f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, "
                               f"got {checkpoint_format!r}")
    bits, out_f = m.bits, m.out_features
    if bits == 3 and (m.in_features % 32 or out_f % 32):
        raise TensorpressError(
            f"{name} is {out_f}x{m.in_features}: 3-bit GPTQ packs blocks of 32 values into 3 words, so both "
            f"dimensions must be multiples of 32 (GPTQModel refuses others); use 2, 4 or 8 bits")
    if m.group_size != -1 and m.in_features % m.group_size:
        raise TensorpressError(
            f"{name}: in_features {m.in_features} is not a multiple of group_size {m.group_size}; GPTQ consumers "
            f"fail on a ragged last group (GPTQModel's CPU kernel and vLLM's Marlin need whole groups) — use a "
            f"group size dividing {m.in_features}")
    zeros = unpack_bits(m.qzeros, bits, out_f, dim=1)                     # [G, out], actual zero points
    if m.sym and not bool((zeros == 2 ** (bits - 1)).all()):
        raise TensorpressError(f"{name} is marked symmetric but its zero points are not {2 ** (bits - 1)}; "
                               f"the checkpoint is inconsistent")
    if checkpoint_format == "gptq":
        if not m.sym:
            raise TensorpressError(
                f"{name} is asymmetric: GPTQ v1 (checkpoint_format='gptq') cannot hold a zero point of 0 and "
                f"GPTQModel refuses sym=false v1 checkpoints; use checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    t = {
        "qweight": m.qweight.detach().to(torch.int32).contiguous(),
        "qzeros": pack_bits(zeros, bits, dim=1),
        "scales": m.scales.detach().to(torch.float16).contiguous(),
        "g_idx": contiguous_g_idx(m).contiguous(),
    }
    if m.bias is not None:
        t["bias"] = m.bias.detach().to(dtype).contiguous()
    return {k: v.cpu() for k, v in t.items()}


def read_gptq_tensors(t: dict[str, torch.Tensor], bits: int, in_features: int, checkpoint_format: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse view: ``(codes [in, out], zeros [G, out], scales [G, out] fp32, g_idx [in])``."""
    out_f = t["scales"].shape[1]
    codes = unpack_bits(t["qweight"], bits, in_features, dim=0)
    zeros = unpack_bits(t["qzeros"], bits, out_f, dim=1)
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    return codes, zeros, t["scales"].float(), t["g_idx"].long()


def dequantize_gptq(t: dict[str, torch.Tensor], bits: int, in_features: int, checkpoint_format: str
                    ) -> torch.Tensor:
    """Dense fp32 ``W [out, in]`` from GPTQ tensors, as a GPTQ consumer computes it."""
    codes, zeros, scales, g = read_gptq_tensors(t, bits, in_features, checkpoint_format)
    return (scales[g] * (codes.float() - zeros[g].float())).t()


def _uniform_scheme(quant: dict[str, QuantLinear]) -> tuple[int, int, bool]:
    schemes: dict[tuple, str] = {}
    for n, m in quant.items():
        schemes.setdefault(module_scheme(m), n)
    if len(schemes) > 1:
        (s1, n1), (s2, n2) = list(schemes.items())[:2]
        raise TensorpressError(
            f"GPTQ export needs one scheme for all quantised linears, but {n1} is (bits, group, sym)={s1} and "
            f"{n2} is {s2} (transformers ignores GPTQModel's per-module 'dynamic' overrides); re-compress with "
            f"one scheme or export as compressed-tensors, which supports several")
    return next(iter(schemes))


def export_gptq(src: Source, tmp: Path, checkpoint_format: str | None = None,
                max_shard_bytes: int | None = None) -> dict:
    """Write a GPTQ checkpoint of ``src`` into ``tmp``; returns the quantization config written."""
    model = src.model
    inv = inventory(model, "GPTQ")
    bits, group_size, sym = _uniform_scheme(inv.compressed)
    if checkpoint_format is None:
        checkpoint_format = "gptq" if sym else "gptq_v2"
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise TensorpressError(f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, "
                               f"got {checkpoint_format!r}")
    desc_act = any(has_act_order(m) for m in inv.compressed.values())
    dtype = src.dtype

    tensors = dense_state(model, inv, dtype)
    check_tied_head(model, tensors, inv)
    for name, m in inv.compressed.items():
        for k, v in gptq_tensors(m, checkpoint_format, dtype, name).items():
            tensors[f"{name}.{k}"] = v

    prov = provenance(src, "gptq", checkpoint_format=checkpoint_format,
                      tested_with={"gptqmodel": "7.6.0", "optimum": "2.3.0", "transformers": "5.17.0"})
    qc = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"tensorpress:{prov['version']}"], "tensorpress": prov},
    }
    if inv.dense_linears:
        # Decoder linears left dense. GPTQModel and vLLM read `dynamic` negative matches; transformers
        # (optimum) reads `modules_in_block_to_quantize` (module names are matched by suffix, full
        # names are exact).
        qc["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in inv.dense_linears}
        qc["modules_in_block_to_quantize"] = [list(inv.compressed)]
    metadata = {"producer": f"tensorpress {prov['version']}", "tensorpress_export": "gptq",
                "checkpoint_format": checkpoint_format}
    if src.recipe is not None:
        metadata["tensorpress_recipe"] = json.dumps(src.recipe, sort_keys=True, default=str)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    write_checkpoint(tmp, src, tensors, config_dict(src, qc), metadata,
                     extra_json={"quantize_config.json": qc}, **kw)
    if not any((tmp / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        warnings.warn("GPTQ export written without a tokenizer: GPTQModel.load refuses such a directory "
                      "(transformers loads it); pass tokenizer=... or export from a checkpoint that has one",
                      stacklevel=4)
    return qc
