"""Serving-side pieces of load-time structured pruning (UniQL, docs: lowrank-quant.md §7.10-7.12).

No compressor or calibration code is imported here: a loaded checkpoint plus these functions is all
a server needs to run a sorted model at a pruning rate chosen on the device.

* :class:`SortedQuantLinear` / :class:`SortedDenseLinear` are the plain ``quant`` / ``dense`` formats
  with the sorting metadata added to their ``config()`` entry (the checkpoint's module table carries
  it; they load back as plain :class:`QuantLinear` / :class:`DenseLinear`).
* :func:`slice_linear` keeps chosen output rows and/or input columns of a dense, ``nn.Linear`` or
  group-quantised module. Rows are always exact; input columns must be whole quantisation groups,
  which the sorted layout guarantees (kept sizes are multiples of the groups), so slicing the codes
  and scales equals slicing the dequantised weight exactly (§7.15 property 7, no re-quantisation).
* :class:`ElasticAttention` is a Llama/Qwen2/Mistral attention with reduced q/k head dims ``d'`` and
  v/o dims ``d_v``: q/k rows are in the RoPE-pair layout ``[kept first halves | their partners]``,
  so ``rotate_half`` on the reduced head still pairs each channel with its original partner, and the
  rotary ``cos``/``sin`` are gathered per KV group by the original channel index of every kept row
  (§7.11, a ``torch`` gather instead of the fused kernel). The attention scale stays
  ``original_head_dim ** -0.5``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import TensorpressError
from ..packing import pack_bits, unpack_bits
from .modules import CompressedLinear, DenseLinear, QuantLinear

META_KEY = "uniql"          # key of the sorting metadata in a module's config entry
META_VERSION = 1


class _WithMeta:
    """Adds ``self.meta`` (JSON-able) to the module's config entry under ``"uniql"``."""
    meta: dict

    def config(self):
        return {**super().config(), META_KEY: self.meta}


class SortedQuantLinear(_WithMeta, QuantLinear):
    """A :class:`QuantLinear` (format ``quant``) whose weights are in UniQL's sorted layout."""

    @classmethod
    def wrap(cls, q: QuantLinear, meta: dict) -> "SortedQuantLinear":
        m = cls(q.in_features, q.out_features, q.bias is not None, q.bits, q.group_size, q.sym, q.g_idx is not None,
                0, q.dtype_)
        for n in ("qweight", "scales", "qzeros"):
            getattr(m, n).copy_(getattr(q, n))
        if q.bias is not None:
            m.bias.data.copy_(q.bias.data)
        m.meta = meta
        return m


class SortedDenseLinear(_WithMeta, DenseLinear):
    """A :class:`DenseLinear` (format ``dense``) whose weights are in UniQL's sorted layout (no quantiser)."""

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, meta: dict, dtype) -> "SortedDenseLinear":
        m = cls(weight.shape[1], weight.shape[0], bias is not None, 0, dtype)
        m.weight.data.copy_(weight.to(dtype))
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        m.meta = meta
        return m


# --- slicing ---------------------------------------------------------------------------------------

def _as_index(idx, n: int, what: str) -> torch.Tensor | None:
    if idx is None:
        return None
    t = torch.as_tensor(idx, dtype=torch.long).flatten()
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= n or t.unique().numel() != t.numel():
        raise TensorpressError(f"bad {what} selection for a dimension of size {n}")
    return t


def slice_linear(m: nn.Module, rows=None, cols=None) -> nn.Module:
    """A new module computing ``m``'s outputs ``rows`` from its inputs ``cols`` only (``None``: all).

    ``nn.Linear``, :class:`DenseLinear` and :class:`QuantLinear` (contiguous groups, any correction)
    are supported. For a quantised module every input group must be kept whole or dropped whole,
    and ``cols`` must be ascending: then the kept codes, scales and zeros are exactly the rows of the
    original ones and nothing is re-quantised."""
    out_f, in_f = m.out_features, m.in_features
    r, c = _as_index(rows, out_f, "output-row"), _as_index(cols, in_f, "input-column")
    nr = out_f if r is None else r.numel()
    nc = in_f if c is None else c.numel()

    def take(t, dim, idx):
        return t if idx is None or t is None else t.index_select(dim, idx.to(t.device))

    if isinstance(m, nn.Linear):
        new = nn.Linear(nc, nr, bias=m.bias is not None, dtype=m.weight.dtype, device=m.weight.device)
        with torch.no_grad():
            new.weight.copy_(take(take(m.weight, 0, r), 1, c))
            if m.bias is not None:
                new.bias.copy_(take(m.bias, 0, r))
        new.weight.requires_grad_(m.weight.requires_grad)
        return new
    if not isinstance(m, CompressedLinear) or type(m).base_weight is not QuantLinear.base_weight \
            and type(m).base_weight is not DenseLinear.base_weight:
        raise TensorpressError(f"cannot slice a {type(m).__name__} (only dense and group-quantised linears)")
    lr = None
    if m.lr_down is not None:
        lr = (take(m.lr_down.data, 1, c), take(m.lr_up.data, 0, r))
    if isinstance(m, QuantLinear):
        if m.g_idx is not None:
            raise TensorpressError("cannot slice a quantised linear with a permuted group order (g_idx)")
        g = in_f if m.group_size == -1 else m.group_size
        qweight, scales, qzeros = m.qweight, m.scales, m.qzeros
        if c is not None:
            if bool((c[1:] <= c[:-1]).any()):
                raise TensorpressError("input columns of a quantised linear must be kept in ascending order")
            groups = torch.unique(c // g)
            sizes = torch.minimum(torch.full_like(groups, g), in_f - groups * g)
            if sizes.sum().item() != nc:
                raise TensorpressError(f"slicing {nc} of {in_f} inputs would split quantisation groups of {g}: "
                                       f"kept sizes must be whole groups")
            if m.group_size == -1:
                raise TensorpressError("cannot slice the inputs of a per-row quantised linear")
            codes = unpack_bits(qweight, m.bits, in_f, dim=0).index_select(0, c.to(qweight.device))
            qweight = pack_bits(codes, m.bits, dim=0)
            scales, qzeros = take(scales, 0, groups), take(qzeros, 0, groups)
        if r is not None:
            qweight, scales = take(qweight, 1, r), take(scales, 1, r)
            z = unpack_bits(qzeros, m.bits, out_f, dim=1).index_select(1, r.to(qzeros.device))
            qzeros = pack_bits(z, m.bits, dim=1)
        new = QuantLinear(nc, nr, m.bias is not None, m.bits, m.group_size, m.sym, False, 0, m.dtype_)
        new.qweight, new.scales, new.qzeros = qweight.contiguous(), scales.contiguous(), qzeros.contiguous()
    else:
        new = DenseLinear(nc, nr, m.bias is not None, 0, m.dtype_)
        new.weight = nn.Parameter(take(take(m.weight.data, 0, r), 1, c).contiguous(), requires_grad=False)
    if m.bias is not None:
        new.bias = nn.Parameter(take(m.bias.data, 0, r).contiguous(), requires_grad=False)
    if lr is not None:
        new.set_correction(lr[0].contiguous(), lr[1].contiguous(), dtype=m.lr_down.dtype)
    return new


# --- the RoPE-pair layout --------------------------------------------------------------------------

def kept_channels(order: torch.Tensor, keep: int) -> torch.Tensor:
    """Original channel indices of the ``keep`` head dims kept from the sorted layout ``order [d]``
    (``[pairs | pairs + d/2]``): the first ``keep/2`` entries of *each half* — never a plain
    prefix, which would separate RoPE partners. Returned in the reduced layout, so row ``j`` and row
    ``j + keep/2`` are partners (``i`` and ``i + d/2``)."""
    d = order.shape[-1]
    if keep % 2 or not 0 < keep <= d:
        raise TensorpressError(f"kept head dim {keep} must be even and in (0, {d}]")
    h = keep // 2
    return torch.cat([order[..., :h], order[..., d // 2:d // 2 + h]], dim=-1)


def check_pair_layout(order: torch.Tensor) -> None:
    """``order [n_kv, d]`` must be ``[p | p + d/2]`` with ``p`` a permutation of ``0..d/2-1``."""
    d = order.shape[-1]
    half = d // 2
    first = order[..., :half]
    ok = d % 2 == 0 and torch.equal(order[..., half:], first + half) and torch.equal(
        first.sort(-1).values, torch.arange(half).expand_as(first))
    if not ok:
        raise TensorpressError("stored Q/K channel order is not a RoPE-pair layout ([pairs | pairs + d/2])")


def gathered_rope(q, k, cos, sin, index: torch.Tensor, n_rep: int):
    """RoPE on reduced heads: ``cos/sin [B, T, d]`` gathered by ``index [n_kv, d']`` (original channel
    of every kept row of KV group g; q-head h uses group ``h // n_rep``), then the standard
    ``x·cos + rotate_half(x)·sin`` on the reduced head."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    ck = cos[..., index].permute(0, 2, 1, 3)          # [B, n_kv, T, d']
    sk = sin[..., index].permute(0, 2, 1, 3)
    cq = ck.repeat_interleave(n_rep, dim=1) if n_rep > 1 else ck
    sq = sk.repeat_interleave(n_rep, dim=1) if n_rep > 1 else sk

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return (q * cq + rot(q) * sq).to(q.dtype), (k * ck + rot(k) * sk).to(k.dtype)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    n_rep = module.num_key_value_groups
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


class ElasticAttention(nn.Module):
    """Attention of a pruned sorted block (Llama / Qwen2 / Mistral forward, reduced head dims).

    ``q_proj [n_heads·d', hidden]`` and ``k_proj [n_kv·d', hidden]`` hold rows in the reduced RoPE-pair
    layout, ``v_proj [n_kv·d_v, hidden]`` and ``o_proj [hidden, n_heads·d_v]`` the kept V/O dims;
    ``rope_index [n_kv, d']`` the original channel of every kept q/k row. The KV cache holds the
    reduced post-RoPE keys (``d'``) and values (``d_v``)."""

    def __init__(self, attn: nn.Module, q_proj, k_proj, v_proj, o_proj, rope_index: torch.Tensor, v_head_dim: int):
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.num_key_value_groups = attn.num_key_value_groups
        self.original_head_dim = attn.original_head_dim if isinstance(attn, ElasticAttention) else attn.head_dim
        self.scaling = attn.scaling                     # the original head dim's scale, unchanged
        self.attention_dropout = getattr(attn, "attention_dropout", 0.0)
        self.is_causal = getattr(attn, "is_causal", True)
        if hasattr(attn, "sliding_window"):              # Qwen2: per layer type
            self.sliding_window = attn.sliding_window
        else:                                            # Mistral: from the config
            self.sliding_window = getattr(attn.config, "sliding_window", None)
        self.head_dim = int(rope_index.shape[-1])
        self.v_head_dim = int(v_head_dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.register_buffer("rope_index", rope_index.long().contiguous(), persistent=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        cache = cache if cache is not None else past_key_values
        shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*shape, -1, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        if cos.shape[-1] != self.original_head_dim:
            raise TensorpressError(f"rotary embeddings of width {cos.shape[-1]} do not cover the head dim "
                                   f"{self.original_head_dim} (partial rotary is not supported)")
        q, k = gathered_rope(q, k, cos, sin, self.rope_index, self.num_key_value_groups)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        except (ImportError, AttributeError):
            fn = _eager_attention
        out, weights = fn(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                          scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        out = out.reshape(*shape, -1).contiguous()
        return self.o_proj(out), weights

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim} (of {self.original_head_dim}), v_head_dim={self.v_head_dim}, "
                f"scaling={self.scaling:.6g} = {self.original_head_dim}^-0.5")
