"""Bit packing shared by modules, checkpoints, exporters and kernels (the one packer).

Codes are unsigned integers in ``[0, 2**bits)``. They are packed LSB-first into a contiguous
bit stream of int32 words along one dimension. For bits dividing 32 this is exactly the GPTQ
layout (4-bit: element ``k`` at bits ``4*(k % 8)`` of word ``k // 8``) and the compressed-tensors
``pack_to_int32`` layout; for 3 bits it is GPTQ's straddling 3-bit stream.
"""
from __future__ import annotations

import torch


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words needed for ``length`` codes of ``bits`` bits."""
    return (length * bits + 31) // 32


def pack_bits(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes (``0 <= c < 2**bits``) along ``dim`` into int32 words."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    c = codes.movedim(dim, 0).to(torch.int64)
    length = c.shape[0]
    rest = c.shape[1:]
    c = c.reshape(length, -1)
    n_words = packed_length(length, bits)
    pos = torch.arange(length, device=c.device, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    out = torch.zeros(n_words + 1, c.shape[1], dtype=torch.int64, device=c.device)
    # Bits never overlap, so adding is the same as OR-ing.
    out.index_add_(0, word, (c << off[:, None]) & 0xFFFFFFFF)
    spill = off + bits > 32
    if bool(spill.any()):
        out.index_add_(0, word[spill] + 1, c[spill] >> (32 - off[spill])[:, None])
    out = out[:n_words]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.reshape(n_words, *rest).movedim(0, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, length: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns int32 codes with ``length`` entries along ``dim``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    p = packed.movedim(dim, 0)
    n_words = p.shape[0]
    if n_words != packed_length(length, bits):
        raise ValueError(f"packed tensor has {n_words} words, {length} codes of {bits} bits need "
                         f"{packed_length(length, bits)}")
    rest = p.shape[1:]
    w = p.reshape(n_words, -1).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:1])], 0)
    pos = torch.arange(length, device=p.device, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    lo = w[word] >> off[:, None]
    hi = w[word + 1] << (32 - off)[:, None]
    mask = (1 << bits) - 1
    codes = ((lo | hi) & mask).to(torch.int32)
    return codes.reshape(length, *rest).movedim(0, dim).contiguous()
