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
    if 32 % bits == 0:
        # Fast path (1/2/4/8 bits: no code straddles two words): shift every word by each slot.
        # Arithmetic shifts of negative int32 words are fine: the mask drops the sign bits.
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=p.device, dtype=torch.int32)
        w32 = p.reshape(n_words, 1, -1).to(torch.int32)
        codes = ((w32 >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(n_words * per, -1)[:length]
        return codes.reshape(length, *rest).movedim(0, dim).contiguous()
    w = p.reshape(n_words, -1).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:1])], 0)
    pos = torch.arange(length, device=p.device, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    lo = w[word] >> off[:, None]
    hi = w[word + 1] << (32 - off)[:, None]
    mask = (1 << bits) - 1
    codes = ((lo | hi) & mask).to(torch.int32)
    return codes.reshape(length, *rest).movedim(0, dim).contiguous()


# =====================================================================================================
# 2:4 semi-structured sparsity: validation and compact layouts
#
# Groups are 4 consecutive *input* weights of ``W [N, K]`` (dim 1, the reduction dim: the orientation
# of ``torch.sparse.to_sparse_semi_structured``). Two layouts hold exactly two entries per group:
#
# * kernel layout: ``values [N, K/2]`` (the two kept weights of each group, in input order) and
#   ``meta int32 [N, ceil(K/32)]``: the 2-bit in-group index of each value, LSB-first, 16 per word
#   (:func:`pack_bits` with ``bits=2``): value ``j`` is ``W[n, 4·(j//2) + idx[n, j]]``;
# * on-disk layout (legacy compressed-tensors ``sparse-24-bitmask``): ``compressed [N, K/2]`` (the same
#   tensor as ``values``) and ``bitmask uint8 [N, ceil(K/8)]`` = ``numpy.packbits(keep, axis=-1,
#   bitorder="little")`` of the keep mask.
#
# A group with fewer than two non-zeros keeps explicit zeros at its lowest free positions. Anything
# with more than two non-zeros in a group is rejected: converters elsewhere silently drop the extras.
# =====================================================================================================


def check_24(w: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``w [N, K]`` has at most 2 non-zeros in every group of 4 inputs."""
    if w.dim() != 2 or w.shape[1] % 4:
        raise ValueError(f"2:4 needs a 2-D weight with in_features divisible by 4, got shape {tuple(w.shape)}")
    nnz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    bad = (nnz > 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise ValueError(f"weight is not 2:4: row {r}, group {g} (inputs {4 * g}..{4 * g + 3}) has "
                         f"{int(nnz[r, g])} non-zeros")


def _two_positions(keep: torch.Tensor) -> torch.Tensor:
    """In-group indices [..., 2] (ascending) of the kept entries of ``keep [..., 4]``, filling with the
    lowest non-kept positions when fewer than two are marked."""
    rank = (~keep).to(torch.int64) * 4 + torch.arange(4, device=keep.device)
    return rank.argsort(-1)[..., :2].sort(-1).values


def pack_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and compress a 2:4 weight ``[N, K]`` to ``(values [N, K/2], meta int32 [N, ceil(K/32)])``."""
    check_24(w)
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    idx = _two_positions(groups != 0)
    values = groups.gather(-1, idx).reshape(n, k // 2)
    return values.contiguous(), pack_bits(idx.reshape(n, k // 2), 2, dim=1)


def _meta_index(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    if in_features % 4:
        raise ValueError(f"2:4 needs in_features divisible by 4, got {in_features}")
    idx = unpack_bits(meta, 2, in_features // 2, dim=1).to(torch.int64).reshape(meta.shape[0], -1, 2)
    bad = (idx[..., 0] >= idx[..., 1]).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise ValueError(f"corrupt 2:4 metadata: row {r}, group {g} indices {idx[r, g].tolist()} are not increasing")
    return idx


def unpack_24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``[N, K]`` weight from the kernel layout."""
    idx = _meta_index(meta, in_features)
    n = values.shape[0]
    w = torch.zeros(n, in_features // 4, 4, dtype=values.dtype, device=values.device)
    return w.scatter_(-1, idx, values.reshape(n, -1, 2)).reshape(n, in_features)


def meta_to_bitmask(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """2-bit indices → little-endian packed keep mask ``uint8 [N, ceil(K/8)]``."""
    idx = _meta_index(meta, in_features)
    keep = torch.zeros(*idx.shape[:2], 4, dtype=torch.bool, device=meta.device).scatter_(-1, idx, True)
    keep = keep.reshape(meta.shape[0], in_features)
    keep = torch.nn.functional.pad(keep, (0, -in_features % 8)).reshape(meta.shape[0], -1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=meta.device)
    return (keep.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def bitmask_to_meta(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Little-endian packed keep mask (exactly two bits per group of 4) → 2-bit index ``meta``."""
    if in_features % 4:
        raise ValueError(f"2:4 needs in_features divisible by 4, got {in_features}")
    n = bitmask.shape[0]
    bits = (bitmask.to(torch.int32)[..., None] >> torch.arange(8, device=bitmask.device)) & 1
    keep = bits.reshape(n, -1)[:, :in_features].bool().reshape(n, -1, 4)
    count = keep.sum(-1)
    bad = (count != 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise ValueError(f"bitmask is not 2:4: row {r}, group {g} keeps {int(count[r, g])} of 4 (need exactly 2)")
    return pack_bits(_two_positions(keep).reshape(n, -1), 2, dim=1)


def pack_24_bitmask(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and compress a 2:4 weight to the on-disk ``(compressed [N, K/2], bitmask)`` layout."""
    values, meta = pack_24(w)
    return values, meta_to_bitmask(meta, w.shape[1])


def unpack_24_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``[N, K]`` weight from the on-disk layout."""
    return unpack_24(compressed, bitmask_to_meta(bitmask, in_features), in_features)
