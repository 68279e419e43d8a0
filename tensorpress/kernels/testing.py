"""Random problems for kernel tests and the benchmark (one generator, so both check the same thing)."""
from __future__ import annotations

import torch

from ..packing import pack_24


def poisoned(shape, dtype, device="cpu", pad: int = 8) -> torch.Tensor:
    """An uninitialised-looking tensor: a view into a NaN-filled larger buffer, so that an
    out-of-bounds read (which the interpreter does not detect) shows up as NaN in the output, and a
    missing write stays NaN."""
    *lead, last = shape
    fill = float("nan") if dtype.is_floating_point else -1
    buf = torch.full((*lead, last + pad), fill, dtype=dtype, device=device)
    return buf[..., pad // 2: pad // 2 + last]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|y − ref| / max|ref|`` (NaN-propagating: a NaN anywhere gives NaN)."""
    d = (y.double() - ref.double()).abs().max()
    return float(d / ref.double().abs().max().clamp_min(1e-30))


def random_w4(n: int, k: int, group_size: int, *, sym: bool = True, act_order: bool = False, rank: int = 0,
              bias: bool = False, dtype=torch.float16, device="cpu", seed: int = 0) -> dict:
    """GPTQ-layout 4-bit layer ``[N, K]`` (+ optional low-rank factors, bias) as keyword arguments of
    ``quant_linear`` (minus ``x``). Packed words are drawn directly (every nibble uniform in 0..15,
    including the padding nibbles of a ragged last word, which kernels must ignore); symmetric
    layers store the zero point 8."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *shape, **kw: torch.randn(*shape, generator=gen, device=dev, **kw)
    words = lambda *shape: torch.randint(-2**31, 2**31, shape, generator=gen, device=dev, dtype=torch.int32)
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    qzeros = torch.full((n_groups, -(-n // 8)), 0x88888888 - 2**32, dtype=torch.int32, device=dev) if sym \
        else words(n_groups, -(-n // 8))
    scales = (torch.rand(n_groups, n, generator=gen, device=dev) * 0.02 + 0.005).to(torch.float16)
    g_idx = None
    if act_order:   # desc_act: groups follow a permutation of the inputs
        perm = torch.randperm(k, generator=gen, device=dev)
        g_idx = (torch.argsort(perm) // g).to(torch.int32)
    out = dict(qweight=words(-(-k // 8), n), scales=scales, qzeros=qzeros, g_idx=g_idx, bits=4,
               group_size=group_size, in_features=k, bias=None, lr_down=None, lr_up=None)
    if bias:
        out["bias"] = (r(n) * 0.1).to(dtype)
    if rank:
        out["lr_down"] = (r(rank, k) / k ** 0.5).to(dtype)
        out["lr_up"] = (r(n, rank) * 0.05).to(dtype)
    return out


def random_24(n: int, k: int, *, armor: int = 0, bias: bool = False, dtype=torch.float16, device="cpu",
              seed: int = 0) -> dict:
    """2:4 layer in the kernel layout (some groups with fewer than 2 non-zeros), optional ARMOR
    wrappers of block size ``armor``, as keyword arguments of ``sparse24_linear`` (minus ``x``)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, device=dev)
    w = torch.randn(n, k // 4, 4, generator=gen, device=dev) * 0.05
    keep = rand(n, k // 4, 4).argsort(-1)[..., :2]
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= rand(n, k // 4, 1) > 0.1                           # ~10 % of groups keep fewer than 2
    values, meta = pack_24((w * mask).reshape(n, k).to(dtype))
    out = dict(values=values, meta=meta, in_features=k, bias=None, armor_a=None, armor_b=None)
    if bias:
        out["bias"] = (torch.randn(n, generator=gen, device=dev) * 0.1).to(dtype)
    if armor:
        eye = torch.eye(armor, device=dev)
        blocks = lambda nb: (eye + 0.1 * torch.randn(nb, armor, armor, generator=gen, device=dev)).to(dtype)
        out["armor_a"], out["armor_b"] = blocks(n // armor), blocks(k // armor)
    return out
