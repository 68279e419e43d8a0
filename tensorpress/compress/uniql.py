"""UniQL (arXiv 2512.03383; docs: lowrank-quant.md §7): structured weight sorting + 4-bit quantisation,
so that ONE checkpoint can be pruned to any rate in ``[0, max_rate]`` when it is loaded
(:func:`tensorpress.elastic.load`). Reimplemented from the paper and the docs only (the reference
code's licence forbids reuse). Transformer blocks of the Llama / Qwen2 / Mistral families.

Per decoder block, from the calibration statistics (the pipeline's ``prepare_block`` hook sees all
seven linears of the block before any is compressed):

* **MLP, ridge leverage (§7.3).** ``C = E[z zᵀ]`` of the ``down_proj`` input, ``score_j =
  diag(C (C + λI)⁻¹)_j`` with ``λ = ridge_lambda · mean(diag C)`` (relative, so the order does not
  depend on the scale of the statistics; the reference's absolute λ = 1 on per-sequence sums of 2048
  tokens is ≈ 1e-2 relative for Llama-scale activations); channels sorted by descending score
  (stable: deterministic ties), ``gate``/``up`` rows and ``down`` columns permuted by that order. No
  Nyström refit, so every prefix is the solution at its own size (nested).
* **Q/K, RoPE-pair score (§7.4).** Per KV group, ``s_i = sqrt(C_K,ii · Σ_h C_Qh,ii)`` on RoPE'd
  activations and pair score ``p_i = s_i + s_{i+d/2}``; pairs sorted by descending score; the order is
  ``[pairs | pairs + d/2]``. The post-RoPE diagonals come from the Gram of the block input, the
  model's own rotary embeddings for positions ``0..L-1`` (``L`` the calibration length) and the 2×2
  pre-RoPE moments of each pair, assuming token statistics independent of position (exact for the
  Gram part; biases use the sample mean of the input). **Storage:** q/k keep their original row
  order in the checkpoint and the order is metadata; the loader gathers the kept rows in the sorted
  layout. Row selection of group-quantised weights is exact, and the rate-0 checkpoint stays a
  standard model for every reader (exporters, ``from_pretrained``) — a physically permuted q/k would
  need the index-gathered RoPE even at rate 0.
* **V/O, "quantisation-aware" SVD (§7.5).** ``C^{±1/2}`` of the block input's Gram (eigenvalues
  clamped at ``eig_eps · λ_max``); GQA per KV group ``C^{1/2} W_V[g] = U S Vh``, ``W_V' = C^{-1/2} U S``
  (all singular values on the V side), ``W_O'[h] = Vh W_O[h]``; MHA per head the double SVD of the
  whitened head product. Exact at full rank whatever the clamp (``C^{-1/2} C^{1/2} = I``). Qwen2's
  ``v`` bias is folded into an ``o_proj`` bias (exact: attention rows sum to 1).

The shipped recipe ``uniql-w4`` takes the statistics from the dense stream (``stats_source: dense``): the
docs' sorting reads every block's inputs from the original model (§7.2), and the GPTQ of each block
then uses the same statistics.

The block's dense linears are rewritten into this sorted basis in place (a function-preserving
transform) and the statistics of ``down``/``o`` inputs are permuted/rotated to match, so the
pipeline's per-linear error record and any later stage (e.g. an EoRA correction) see the sorted
layer consistently. Each linear is then quantised on its sorted Gram: GPTQ, RTN, or nothing
(``quantizer: none``, for exactness tests). GPTQ's act-order is allowed only with static groups: the
docs rule act-order out because it makes ``g_idx`` non-monotone; with groups fixed on the stored
(sorted) order the codes stay in that order with contiguous groups, so prefix slicing still keeps
whole groups (only the order in which columns are processed changes; on the protocol model it takes
rate-0 perplexity from +42 % to +15 % over dense, as for the project's ``gptq-w4g64``).
Input groups are aligned with what slicing keeps: kept MLP widths are multiples of ``mlp_grid``
(a multiple of ``group_size``), kept head dims multiples of ``head_grid``, and ``o_proj`` uses groups
of ``gcd(group_size, head_grid)`` so every kept per-head prefix is whole groups (no re-quantisation
on the device, unlike the reference's o_proj path).

**Layer-wise allocation (§7.7)** needs each block's influence ``1 − cos(x_in, y_out)`` on the last
token of each sequence; it is measured by a forward hook on the block during the statistics pass and
stored, with the sort orders and grids, in every module's config entry (``"uniql"``; see
:mod:`tensorpress.nn.elastic`). The allocation itself is computed when the checkpoint is loaded
(:func:`tensorpress.elastic.allocate`), for whatever rate the device asks.

The pipeline gives a compressor linears only; the attention geometry (heads, head dim, rotary) and
the block for the influence hook come from the transformers model that owns the linears, found once
per compression (see :func:`_owner_model`).

``recovery: {...}`` (recipe ``uniql-w4-ft``) adds masked LoRA recovery fine-tuning between sorting
and quantisation (:mod:`.recovery`): the pipeline then runs this stage twice, first with
``quantizer: none`` (sort only), then — after fine-tuning — in *presorted* mode (``presorted``: the
first pass's metadata by module name), which skips the sorting, keeps the stored orders and block
influences and only quantises the already-sorted weights.

``sort: false`` keeps every layer in its original order (no rotation): the same quantiser and the
same load-time slicing, i.e. "pruning the same amount without sorting" (the benchmark's baseline).
"""
from __future__ import annotations

import json
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import TensorpressError
from ..nn import QuantLinear
from ..nn.elastic import META_VERSION, SortedDenseLinear, SortedQuantLinear
from .base import Compressor, LinearContext, check_number, register
from .gptq import gptq_quantize
from .quantizer import QuantSpec, quantize_groups
from .rtn import quant_spec

SUPPORTED = ("llama", "qwen2", "mistral")
ROLES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
QUANTIZERS = ("gptq", "rtn", "none")
ALLOCATIONS = ("influence", "uniform")


# --- the math, as plain functions (the tests call these) ------------------------------------------

@contextmanager
def _one_thread():
    """Run small dense decompositions on one thread: on a loaded machine, OpenMP barriers made a
    576x576 ``eigh`` 200x slower with 2 threads than with 1 (they take well under a second alone)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def ridge_leverage(C: torch.Tensor, lam: float) -> torch.Tensor:
    """``diag(C (C + λI)⁻¹) = 1 − λ·diag((C + λI)⁻¹)`` for a PSD ``C`` (fp64 Cholesky, no
    eigendecomposition or pseudo-inverse): in ``[0, 1)`` for ``λ > 0``."""
    C = C.double()
    A = C + lam * torch.eye(C.shape[0], dtype=C.dtype)
    with _one_thread():
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return (1 - lam * torch.cholesky_inverse(L).diagonal()).clamp(0, 1)
        e, U = torch.linalg.eigh(C)                       # not PD in floating point: the eigen form
    e = e.clamp_min(0)
    return (U * U) @ (e / (e + lam))


def mlp_order(C: torch.Tensor, ridge_lambda: float) -> torch.Tensor:
    """Channels by descending ridge-leverage score, ``λ = ridge_lambda · mean(diag C)``; stable ties."""
    scale = float(C.diagonal().double().mean())
    lam = ridge_lambda * (scale if scale > 0 else 1.0)
    return torch.sort(ridge_leverage(C, lam), descending=True, stable=True).indices


def rope_moments(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position averages ``(E cos², E sin², E cos·sin)`` per first-half channel from ``cos/sin [L, d]``
    (HF ``rotate_half`` convention: channel ``i`` and ``i + d/2`` share one angle)."""
    h = cos.shape[-1] // 2
    c, s = cos[:, :h].double(), sin[:, :h].double()
    return (c * c).mean(0), (s * s).mean(0), (c * s).mean(0)


def _head_moments(W: torch.Tensor, b: torch.Tensor | None, C: torch.Tensor, mu: torch.Tensor | None, d: int):
    """Per head ``[n, d]`` second moments ``E[y_i²]`` and ``[n, d/2]`` cross moments ``E[y_i y_{i+d/2}]``
    of ``y = W x + b`` (``C = E[x xᵀ]``, ``mu = E[x]``)."""
    W = W.double()
    n = W.shape[0] // d
    h = d // 2
    Wh = W.view(n, d, -1)
    M = torch.einsum("nai,ij,nbj->nab", Wh, C.double(), Wh)           # [n, d, d]
    if b is not None:
        b = b.double().view(n, d)
        m = (Wh @ mu.double()) if mu is not None else torch.zeros_like(b)
        M = M + b[:, :, None] * m[:, None, :] + m[:, :, None] * b[:, None, :] + b[:, :, None] * b[:, None, :]
    diag = M.diagonal(dim1=1, dim2=2)
    cross = M[:, :h, h:].diagonal(dim1=1, dim2=2)
    return diag.clamp_min(0), cross


def rope_diag(diag: torch.Tensor, cross: torch.Tensor, moments) -> torch.Tensor:
    """``E[Y_i²]`` after RoPE (``Y_i = y_i cos − y_{i'} sin``, ``Y_{i'} = y_{i'} cos + y_i sin``) with
    position-independent token statistics: ``a E y_i² + b E y_{i'}² ∓ 2c E y_i y_{i'}``."""
    a, b, c = moments
    h = diag.shape[-1] // 2
    d1, d2 = diag[..., :h], diag[..., h:]
    first = a * d1 + b * d2 - 2 * c * cross
    second = a * d2 + b * d1 + 2 * c * cross
    return torch.cat([first, second], -1).clamp_min(0)


def qk_pair_scores(Wq, bq, Wk, bk, C, mu, n_heads: int, n_kv: int, d: int, moments=None) -> torch.Tensor:
    """Pair scores ``p [n_kv, d/2]``: ``s_i = sqrt(C_K,ii · Σ_{h∈g} C_Qh,ii)`` on RoPE'd activations,
    ``p_i = s_i + s_{i+d/2}`` (§7.4, the eigen-free form). ``moments`` from :func:`rope_moments`
    (``None``: uniformly distributed phases, ``E cos² = E sin² = 1/2``, ``E cos·sin = 0``)."""
    h = d // 2
    if moments is None:
        half = torch.full((h,), 0.5, dtype=torch.float64)
        moments = (half, half, torch.zeros(h, dtype=torch.float64))
    ck = rope_diag(*_head_moments(Wk, bk, C, mu, d), moments)                         # [n_kv, d]
    cq = rope_diag(*_head_moments(Wq, bq, C, mu, d), moments)                         # [n_heads, d]
    cq = cq.view(n_kv, n_heads // n_kv, d).sum(1)
    s = (ck * cq).sqrt()
    return s[:, :h] + s[:, h:]


def pair_order(p: torch.Tensor) -> torch.Tensor:
    """``[n_kv, d]`` layout ``[pairs | pairs + d/2]`` from pair scores ``p [n_kv, d/2]`` (descending,
    stable). Pruning to ``d'`` keeps entries ``[0:d'/2] ∪ [d/2 : d/2 + d'/2]``."""
    pairs = torch.sort(p, dim=-1, descending=True, stable=True).indices
    return torch.cat([pairs, pairs + p.shape[-1]], dim=-1)


def sqrt_pair(C: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^{1/2}, C^{-1/2})`` from one fp64 eigendecomposition, eigenvalues clamped at ``eps·λ_max``
    (never inf; ``C^{-1/2} C^{1/2} = I`` exactly in exact arithmetic, whatever the clamp)."""
    with _one_thread():
        e, Q = torch.linalg.eigh(C.double())
    top = float(e.max()) if e.numel() else 1.0
    e = e.clamp_min(eps * (top if top > 0 else 1.0))
    r = e.sqrt()
    return (Q * r) @ Q.T, (Q / r) @ Q.T


def vo_transform(Wv: torch.Tensor, Wo: torch.Tensor, C: torch.Tensor, n_heads: int, n_kv: int, d: int,
                 eps: float = 1e-6):
    """Quantisation-aware SVD of V/O (§7.5). ``Wv [n_kv·d, hidden]``, ``Wo [hidden, n_heads·d]`` (PyTorch
    layouts). Returns ``(Wv', Wo', R)`` with ``R [n_heads, d, d]`` the map of each head's attention
    output into the new basis (column form ``a'_h = R_h a_h``). Singular values are sorted, so the
    first ``k`` dims of every head are the rank-``k`` whitened solution (nested)."""
    Sh, Sih = sqrt_pair(C, eps)
    Wv, Wo = Wv.double(), Wo.double()
    n_rep = n_heads // n_kv
    Wv2, Wo2 = torch.empty_like(Wv), torch.empty_like(Wo)
    R = torch.empty(n_heads, d, d, dtype=torch.float64)
    for g in range(n_kv):
        with _one_thread():
            U, S, Vh = torch.linalg.svd(Sh @ Wv[g * d:(g + 1) * d].T, full_matrices=False)  # [hid, d] = U S Vh
        if n_rep > 1:                         # GQA: all singular values on the V side, W_O' = Vh W_O
            Wv2[g * d:(g + 1) * d] = (Sih @ (U * S)).T
            for h in range(g * n_rep, (g + 1) * n_rep):
                Wo2[:, h * d:(h + 1) * d] = Wo[:, h * d:(h + 1) * d] @ Vh.T
                R[h] = Vh
        else:                                 # MHA: optimal rank-k of the whitened head product
            B = (S[:, None] * Vh) @ Wo[:, g * d:(g + 1) * d].T                           # [d, hidden]
            with _one_thread():
                U2, S2, Vh2 = torch.linalg.svd(B, full_matrices=False)
            Wv2[g * d:(g + 1) * d] = (Sih @ (U @ U2) * S2).T
            Wo2[:, g * d:(g + 1) * d] = Vh2.T
            inv = torch.where(S > S.max() * 1e-12, 1.0 / S, torch.zeros_like(S))
            R[g] = ((Vh.T * inv) @ U2 * S2).T                     # v' = v·T, T = Vhᵀ S⁻¹ U2 S2; R = Tᵀ
    return Wv2, Wo2, R


def fold_v_bias(bv: torch.Tensor, Wo: torch.Tensor, bo: torch.Tensor | None, n_heads: int, n_kv: int, d: int):
    """``b_O' = b_O + Σ_h W_O[h] b_V[g(h)]`` (the original ``W_O``): exact, attention rows sum to 1."""
    n_rep = n_heads // n_kv
    bvh = bv.double().view(n_kv, d).repeat_interleave(n_rep, 0).reshape(-1)
    out = Wo.double() @ bvh
    return out if bo is None else out + bo.double()


def _blockdiag_rotate(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``B G Bᵀ`` for ``B = blockdiag(R_h)`` without forming ``B``."""
    n, d, _ = R.shape
    G4 = G.view(n, d, n, d)
    return torch.einsum("hab,hbkc,kdc->hakd", R, G4, R).reshape(n * d, n * d)


# --- finding the model that owns the linears ------------------------------------------------------

def _owner_model(linear: nn.Module, name: str, known: list) -> nn.Module:
    """The transformers model whose module ``name`` is ``linear``. The pipeline hands compressors
    linears only; UniQL needs the attention geometry, the rotary embedding and the block (for the
    influence hook), so it finds the owner once per compression: first among models already found,
    then by one scan of the live objects."""
    for ref in known:
        m = ref()
        if m is not None and _has(m, name, linear):
            return m
    import gc
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        raise TensorpressError("uniql needs a transformers model") from None
    for obj in gc.get_objects():
        try:          # type(), not isinstance(): no __class__ property of a foreign object is evaluated
            if issubclass(type(obj), PreTrainedModel) and _has(obj, name, linear):
                known.append(weakref.ref(obj))
                return obj
        except Exception:  # noqa: BLE001  (foreign objects with odd __class__)
            continue
    raise TensorpressError(f"uniql: cannot find the transformers model that owns {name} (UniQL sorts whole "
                           f"decoder blocks of a transformers Llama/Qwen2/Mistral model)")


def _has(model: nn.Module, name: str, linear: nn.Module) -> bool:
    try:
        return model.get_submodule(name) is linear
    except AttributeError:
        return False


@dataclass
class _Block:
    index: int
    layer: nn.Module
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int
    intermediate: int
    rotary: nn.Module | None
    handle: object = None
    cos_sum: float = 0.0
    n_seq: int = 0
    seq_len: int = 0


def _split_name(name: str) -> tuple[str, int, str]:
    for local in ROLES:
        if name.endswith("." + local):
            head = name[:-len(local) - 1]
            prefix, _, idx = head.rpartition(".")
            if idx.isdigit():
                return prefix, int(idx), local
    raise TensorpressError(f"uniql applies to the q/k/v/o/gate/up/down linears of Llama/Qwen2/Mistral decoder "
                           f"blocks; {name} is not one of them")


@dataclass
class UniQLParams:
    bits: int = 4
    group_size: int = 64
    sym: bool = True                 # symmetric codes, zero point 2**(bits-1) (UniQL's "zero-point 8")
    quantizer: str = "gptq"          # gptq | rtn | none
    damp: float = 0.01
    act_order: bool = False          # GPTQ column order by decreasing diag(H); needs static_groups
    static_groups: bool = False      # groups fixed on the stored (sorted) order: contiguous, sliceable
    clip_search: bool = False
    sort: bool = True                # false: original order, no rotation (the "unsorted" baseline)
    ridge_lambda: float = 0.01       # relative to mean(diag C)
    eig_eps: float = 1e-6            # relative eigenvalue clamp of C^{±1/2}
    head_grid: int = 16              # kept q/k head dims and v/o dims: multiples of this
    mlp_grid: int = 64               # kept MLP widths: multiples of this
    max_rate: float = 0.5            # largest global pruning rate the loader accepts
    max_part_rate: float = 0.85      # largest fraction pruned from one layer's attention or MLP
    allocation: str = "influence"    # influence (docs §7.7, renormalised) | uniform
    epsilon: float = 0.1             # softmax temperature of the influence allocation
    recovery: dict | None = None     # masked LoRA recovery fine-tuning settings (see .recovery); None: off


@register
class UniQL(Compressor):
    name = "uniql"
    description = ("UniQL: structured sorting (MLP ridge leverage, RoPE-pair Q/K, quantisation-aware V/O SVD) + "
                   "4-bit weights; the pruning rate is chosen when the checkpoint is loaded")
    requires = frozenset({"gram", "input_sample"})
    Params = UniQLParams

    def validate(self):
        p = self.params
        if p.quantizer not in QUANTIZERS:
            raise TensorpressError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {p.quantizer!r}")
        if p.allocation not in ALLOCATIONS:
            raise TensorpressError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {p.allocation!r}")
        for k in ("sort", "clip_search", "act_order", "static_groups"):
            if not isinstance(getattr(p, k), bool):
                raise TensorpressError(f"{k} must be true or false")
        check_number("head_grid", p.head_grid, 2, integer=True)
        check_number("mlp_grid", p.mlp_grid, 1, integer=True)
        if p.head_grid % 2:
            raise TensorpressError(f"head_grid must be even (RoPE pairs are kept together), got {p.head_grid}")
        check_number("ridge_lambda", p.ridge_lambda, 0, lo_open=True)
        check_number("eig_eps", p.eig_eps, 0, 1, lo_open=True, hi_open=True)
        check_number("max_rate", p.max_rate, 0, 1, lo_open=True, hi_open=True)
        check_number("max_part_rate", p.max_part_rate, 0, 1, lo_open=True, hi_open=True)
        check_number("epsilon", p.epsilon, 0, lo_open=True)
        check_number("damp", p.damp, 0, 1, lo_open=True)
        if p.act_order and not p.static_groups:
            raise TensorpressError("act_order needs static_groups: true (groups must stay contiguous in the sorted "
                                   "order so that slicing keeps whole groups)")
        if p.max_rate > p.max_part_rate:
            raise TensorpressError(f"max_rate {p.max_rate} cannot exceed max_part_rate {p.max_part_rate}")
        if p.recovery is not None:
            from .recovery import RecoverySettings, training_rates
            training_rates(RecoverySettings.parse(p.recovery), p.max_rate)      # bad settings fail at load
        self.spec = self.spec_o = None
        if p.quantizer != "none":
            self.spec = quant_spec(p)
            if p.group_size == -1 or p.mlp_grid % p.group_size:
                raise TensorpressError(f"mlp_grid {p.mlp_grid} must be a multiple of group_size {p.group_size} "
                                       f"(down_proj's input groups must not straddle what slicing keeps)")
            og = math.gcd(p.group_size, p.head_grid)
            self.spec_o = QuantSpec(p.bits, og, p.sym, p.clip_search).validate()
        self._known: list = []
        self._blocks: dict[int, _Block] = {}
        self._meta: dict[str, dict] = {}
        # Presorted mode (recovery fine-tuning's quantisation pass, set by .recovery): module name ->
        # the sorting metadata of a model whose plain linears are already in the sorted layout.
        self.presorted: dict[str, dict] | None = None

    # --- plan time ------------------------------------------------------------------------------------
    def check_layer(self, ctx: LinearContext):
        prefix, i, local = _split_name(ctx.name)
        blk = self._block(ctx.original, ctx.name, prefix, i)
        p = self.params
        if local == "self_attn.q_proj":
            if blk.head_dim % p.head_grid:
                raise TensorpressError(f"{ctx.name}: head dim {blk.head_dim} is not a multiple of head_grid {p.head_grid}")
        if local == "mlp.down_proj" and blk.intermediate % p.mlp_grid:
            raise TensorpressError(f"{ctx.name}: intermediate size {blk.intermediate} is not a multiple of mlp_grid "
                                   f"{p.mlp_grid}")
        if self.spec is not None:
            (self.spec_o if local == "self_attn.o_proj" else self.spec).validate(ctx.original.in_features)

    def _block(self, linear, name, prefix, i) -> _Block:
        if i in self._blocks and self._blocks[i].layer is not None and _has(self._blocks[i].layer, name.split(f"{prefix}.{i}.", 1)[1], linear):
            return self._blocks[i]
        root = _owner_model(linear, name, self._known)
        cfg = root.config.get_text_config()
        mt = getattr(cfg, "model_type", "?")
        if mt not in SUPPORTED:
            raise TensorpressError(f"uniql supports Llama, Qwen2 and Mistral decoders; {type(root).__name__} "
                                   f"(model_type {mt!r}) is not supported (its attention is not the plain RoPE "
                                   f"attention the load-time slicing rebuilds)")
        prf = getattr(cfg, "partial_rotary_factor", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
            "partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise TensorpressError(f"uniql: partial rotary embeddings (factor {prf}) are not supported")
        layer = root.get_submodule(f"{prefix}.{i}")
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                                  "head_dim", "num_key_value_groups")) \
                or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            raise TensorpressError(f"uniql: block {prefix}.{i} is not a Llama-style attention + gated MLP block")
        d = int(attn.head_dim)
        if d % 2:
            raise TensorpressError(f"uniql: head dim {d} is odd (RoPE pairs need an even head dim)")
        n_heads = attn.q_proj.out_features // d
        n_kv = attn.k_proj.out_features // d
        if n_heads * d != attn.q_proj.out_features or n_kv * d != attn.k_proj.out_features or n_heads % n_kv \
                or n_heads // n_kv != attn.num_key_value_groups:
            raise TensorpressError(f"uniql: inconsistent attention shapes in block {prefix}.{i}")
        inner = getattr(root, "model", None)
        rotary = getattr(inner, "rotary_emb", None) if inner is not None else None
        old = self._blocks.get(i)
        if old is not None and old.handle is not None:
            old.handle.remove()
        blk = _Block(i, layer, n_heads, n_kv, d, attn.q_proj.in_features, mlp.down_proj.in_features, rotary)
        blk.handle = layer.register_forward_hook(self._influence_hook(blk))
        self._blocks[i] = blk
        return blk

    @staticmethod
    def _influence_hook(blk: _Block):
        def hook(module, args, output):
            if not args or not torch.is_tensor(args[0]):
                return
            x = args[0]
            y = output[0] if isinstance(output, tuple) else output
            if y is x or not torch.is_tensor(y) or x.dim() != 3 or y.shape != x.shape:
                return                                  # the calibration recorder (returns its input)
            with torch.no_grad():
                c = torch.nn.functional.cosine_similarity(x[:, -1].double(), y[:, -1].double(), dim=-1)
            blk.cos_sum += float(c.sum())
            blk.n_seq += int(c.numel())
            blk.seq_len = int(x.shape[1])
        return hook

    # --- the block transform --------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_block(self, ctxs: dict[str, LinearContext]) -> None:
        by_role, index, prefix = {}, None, None
        for name, c in ctxs.items():
            prefix, i, local = _split_name(name)
            if index is not None and i != index:
                raise TensorpressError("uniql: prepare_block got linears of two blocks")
            index = i
            by_role[ROLES[local]] = c
        missing = [r for r in ROLES.values() if r not in by_role]
        if missing:
            raise TensorpressError(f"uniql sorts whole blocks: block {prefix}.{index} lacks {', '.join(missing)} in "
                                   f"the recipe's targets (target all of q/k/v/o/gate/up/down)")
        q = by_role["q"]
        blk = self._block(q.original, q.name, prefix, index)
        p = self.params
        d, nh, nkv = blk.head_dim, blk.n_heads, blk.n_kv
        influence = None if blk.n_seq == 0 else 1.0 - blk.cos_sum / blk.n_seq
        if blk.handle is not None:
            blk.handle.remove()
            blk.handle = None
        blk.layer = None                                 # nothing of the block is needed any more
        if self.presorted is not None:
            self._use_presorted(by_role)
            return

        Cx = q.stats.gram()
        Wq, Wk, Wv, Wo = (by_role[r].weight.double() for r in ("q", "k", "v", "o"))
        bq, bk, bv, bo = (by_role[r].bias for r in ("q", "k", "v", "o"))
        Wg, Wu, Wd = (by_role[r].weight.double() for r in ("gate", "up", "down"))
        n_int = Wd.shape[1]
        if p.sort:
            mu = None
            if bq is not None or bk is not None:
                mu = q.stats.input_sample().double().mean(0)
            moments = None
            if blk.rotary is not None and blk.seq_len > 0:
                pos = torch.arange(blk.seq_len)[None]
                ref = blk.rotary.inv_freq if hasattr(blk.rotary, "inv_freq") else None
                dummy = torch.zeros(1, dtype=torch.float32, device=ref.device if ref is not None else "cpu")
                cos, sin = blk.rotary(dummy, pos.to(dummy.device))
                if cos.shape[-1] != d:
                    raise TensorpressError(f"uniql: rotary width {cos.shape[-1]} differs from head dim {d}")
                moments = rope_moments(cos[0].cpu(), sin[0].cpu())
            order = pair_order(qk_pair_scores(Wq, bq, Wk, bk, Cx, mu, nh, nkv, d, moments))
            morder = mlp_order(by_role["down"].stats.gram(), p.ridge_lambda)
            Wv2, Wo2, R = vo_transform(Wv, Wo, Cx, nh, nkv, d, p.eig_eps)
            bo2 = fold_v_bias(bv, Wo, bo, nh, nkv, d) if bv is not None else bo
            self._set(by_role["gate"], Wg[morder], None if by_role["gate"].bias is None else by_role["gate"].bias[morder])
            self._set(by_role["up"], Wu[morder], None if by_role["up"].bias is None else by_role["up"].bias[morder])
            self._set(by_role["down"], Wd[:, morder], by_role["down"].bias)
            self._set(by_role["v"], Wv2, None)
            self._set(by_role["o"], Wo2, bo2)
            _permute_stats(by_role["down"].stats, morder)
            _rotate_stats(by_role["o"].stats, R)
        else:
            order = torch.arange(d).repeat(nkv, 1)
        settings = self._settings()
        for role, c in by_role.items():
            meta = {"version": META_VERSION, "role": role, "layer": index}
            if role == "q":
                meta.update(sorted=p.sort, head_dim=d, n_heads=nh, n_kv_heads=nkv, order=order.tolist(),
                            influence=influence, calib_seq_len=blk.seq_len or None, settings=settings)
            elif role == "down":
                meta.update(intermediate_size=n_int)
            self._meta[c.name] = meta

    def _settings(self) -> dict:
        p = self.params
        return {"head_grid": p.head_grid, "mlp_grid": p.mlp_grid, "max_rate": p.max_rate,
                "max_part_rate": p.max_part_rate, "allocation": p.allocation, "epsilon": p.epsilon,
                "quantizer": p.quantizer, "bits": p.bits if p.quantizer != "none" else None,
                "group_size": p.group_size if p.quantizer != "none" else None,
                "o_group_size": self.spec_o.group_size if self.spec_o is not None else None}

    def _use_presorted(self, by_role: dict) -> None:
        """The stored sorting data of linears already in the sorted layout (no sorting here): the
        orders and block influence of the sorting pass, the settings of this quantiser."""
        for role, c in by_role.items():
            meta = self.presorted.get(c.name)
            if not isinstance(meta, dict) or meta.get("role") != role:
                raise TensorpressError(f"uniql: no stored sorting data for {c.name}")
            meta = json.loads(json.dumps(meta))           # a copy: the caller's metadata stays as it was
            if role == "q":
                old = meta.get("settings", {})
                new = self._settings()
                moved = [k for k in ("head_grid", "mlp_grid", "max_rate", "max_part_rate") if old.get(k) != new[k]]
                if moved:
                    raise TensorpressError(f"uniql: {c.name} was sorted with other {', '.join(moved)}")
                meta["settings"] = new
            self._meta[c.name] = meta

    @staticmethod
    def _set(ctx: LinearContext, W: torch.Tensor, b: torch.Tensor | None) -> None:
        """Rewrite the dense linear into the sorted basis (a fresh tensor: the original may be a
        read-only memory map)."""
        m = ctx.original
        dt = m.weight.dtype
        m.weight = nn.Parameter(W.to(dt).contiguous(), requires_grad=False)
        m.bias = None if b is None else nn.Parameter(b.to(dt).contiguous(), requires_grad=False)

    def compress(self, ctx: LinearContext):
        meta = self._meta.pop(ctx.name, None)
        if meta is None:
            raise TensorpressError(f"uniql: {ctx.name} was not prepared with its block (the pipeline's prepare_block "
                                   f"hook must run first)")
        if ctx.current is not ctx.original:
            raise TensorpressError(f"uniql must be the first stage of {ctx.name}")
        W, b = ctx.weight, ctx.bias
        if self.spec is None:
            return SortedDenseLinear.build(W, b, meta, ctx.dtype)
        spec = self.spec_o if meta["role"] == "o" else self.spec
        if self.params.quantizer == "gptq":
            p = self.params
            codes, scales, zeros, g_idx = gptq_quantize(W, ctx.stats.gram(), spec, p.damp, p.act_order, p.static_groups)
            if g_idx is not None:                        # cannot happen with static groups; never store one
                raise TensorpressError(f"{ctx.name}: GPTQ produced permuted groups, which slicing cannot keep whole")
        else:
            codes, scales, zeros = quantize_groups(W, spec)
        q = QuantLinear.from_codes(codes, scales, zeros, bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                                   bias=b, dtype=ctx.dtype)
        return SortedQuantLinear.wrap(q, meta)

    def __del__(self):
        for blk in getattr(self, "_blocks", {}).values():
            if blk.handle is not None:
                try:
                    blk.handle.remove()
                except Exception:  # noqa: BLE001
                    pass


def _permute_stats(s, order: torch.Tensor) -> None:
    """Statistics of the inputs ``z[order]`` (down_proj after the MLP sort)."""
    if s.gram_sum is not None:
        s.gram_sum = s.gram_sum[order][:, order].contiguous()
    for k in ("sq_sum", "abs_sum", "abs_max"):
        v = getattr(s, k)
        if v is not None:
            setattr(s, k, v[order].contiguous())
    if s.sample is not None:
        s.sample = s.sample[:, order].contiguous()


def _rotate_stats(s, R: torch.Tensor) -> None:
    """Statistics of the rotated attention outputs ``a'_h = R_h a_h`` (o_proj after the V/O SVD): the
    Gram and the sample are exact; per-channel absolute statistics cannot be rotated and are dropped."""
    n, d, _ = R.shape
    if s.gram_sum is not None:
        s.gram_sum = _blockdiag_rotate(s.gram_sum.double(), R).to(s.gram_sum.dtype)
        s.sq_sum = s.gram_sum.diagonal().clone() if s.sq_sum is not None else None
    if s.sample is not None:
        X = s.sample.double().view(-1, n, d)
        s.sample = torch.einsum("thb,hab->tha", X, R).reshape(-1, n * d).to(s.sample.dtype)
    s.abs_sum = s.abs_max = None
