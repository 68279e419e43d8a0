"""Load-time structured pruning of UniQL-sorted checkpoints (docs: lowrank-quant.md §7.6-7.12).

::

    import tensorpress as tp
    model = tp.load("out-uniql", prune_rate=0.15)     # slice every layer now; no calibration

    from tensorpress import elastic
    plan = elastic.read_plan(tp.load("out-uniql"))   # the stored sorting data (or of a model just compressed)
    elastic.allocate(plan, 0.25)                     # kept sizes per layer and the realised rate

What the checkpoint stores (each sorted module's config entry, key ``"uniql"``; written by the
``uniql`` compressor, read here without importing any compressor):

* every one of a block's seven linears: ``role`` (q/k/v/o/gate/up/down) and ``layer``;
* ``q_proj``: the head geometry, ``order [n_kv, d]`` — per KV group the RoPE-pair layout
  ``[pairs | pairs + d/2]`` of the q/k channels, best pair first (q/k rows stay in their original
  order on disk) — whether the block was sorted, its block influence ``1 − cos(x_in, y_out)`` and the
  settings (grids, ``max_rate``, ``max_part_rate``, allocation rule, ε);
* gate/up rows, down columns (MLP) and v rows / o columns (V/O) are stored sorted: pruning them is a
  prefix.

**Allocation** (:func:`allocate`). The rate is the fraction of the decoder linears' weights removed.
Each layer has two entries, attention (q/k head dim and v/o dim, one kept size ``d'``, multiple of
``head_grid``) and MLP (kept width, multiple of ``mlp_grid``). With the ``influence`` rule (§7.7) an
entry's sparsity is ∝ ``softmax(−s_ℓ/ε)`` over entries; the docs clamp at ``max_part_rate`` *without*
renormalising (the realised mean drifts below the request); here the proportionality constant is
solved (bisection) so that the clamped, parameter-weighted sparsity equals the request, kept sizes are
rounded to the grids, and single grid steps are then moved (largest rounding residual first) while
that brings the realised rate closer to the request (the move that gets closest first; on ties, the
entry whose rounding was furthest from its continuous share). ``uniform`` gives every entry the same target.

**Slicing** (:func:`apply_sizes`): MLP ``gate``/``up`` rows and ``down`` columns ``[:m]``; v rows and o
columns ``[:d']`` per head; q/k rows per head: the first ``d'/2`` entries of each half of ``order``
(never a naive prefix), gathered into the reduced pair layout; the attention becomes an
:class:`~tensorpress.nn.elastic.ElasticAttention` (rotary cos/sin gathered by those indices, scale
``original_head_dim^-0.5``). Quantised weights are sliced on their codes (whole groups: exact).

:func:`mask_sizes` puts the same pruning on the unsliced model as zero masks (forward hooks): what
masked recovery fine-tuning trains with, and by construction what the loader removes (§7.8 — the
reference's q/k masks differ from its slicing; these do not).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import TensorpressError
from .modeling import decoder_layers, layers_prefix
from .nn.elastic import META_KEY, META_VERSION, ElasticAttention, check_pair_layout, kept_channels, slice_linear

ROLE_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
NO_DATA = ("has no UniQL sorting data: a pruning rate needs a checkpoint compressed with the 'uniql' method "
           "(e.g. recipe uniql-w4)")


@dataclass
class LayerPlan:
    index: int
    head_dim: int
    n_heads: int
    n_kv: int
    hidden: int
    intermediate: int
    order: torch.Tensor            # [n_kv, head_dim] RoPE-pair layout
    influence: float | None

    @property
    def attn_unit(self) -> int:
        """Weights removed per head dim dropped (q, k, v rows and o columns)."""
        return self.hidden * 2 * (self.n_heads + self.n_kv)

    @property
    def mlp_unit(self) -> int:
        return 3 * self.hidden


@dataclass
class ElasticPlan:
    layers: list[LayerPlan]
    settings: dict
    sorted: bool

    @property
    def total(self) -> int:
        return sum(l.head_dim * l.attn_unit + l.intermediate * l.mlp_unit for l in self.layers)

    @property
    def max_rate(self) -> float:
        return float(self.settings["max_rate"])


@dataclass
class Sizes:
    """Kept sizes per layer: ``attn`` (q/k head dim = v/o dim) and ``mlp`` (intermediate width)."""
    attn: list[int]
    mlp: list[int]
    rate: float = 0.0               # the requested rate
    realised: float = 0.0           # fraction of the decoder linears' weights removed
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rate": self.rate, "realised_rate": self.realised, "attn_head_dim": self.attn, "mlp_width": self.mlp}


# --- reading the stored plan ---------------------------------------------------------------------------

def _int(v, what, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise TensorpressError(f"bad UniQL metadata: {what} must be an integer >= {lo}, got {v!r}")
    return v


def read_plan(model: nn.Module, modules: dict | None = None) -> ElasticPlan:
    """The sorting metadata of a loaded checkpoint, validated against the model; a clear
    :class:`TensorpressError` when there is none (not a UniQL checkpoint) or it is inconsistent.
    ``modules`` (module name -> config entry) reads the metadata from there instead (a sorted model
    whose linears are plain again, as in recovery fine-tuning)."""
    qc = {} if modules is not None else getattr(model.config, "quantization_config", None)
    if modules is None:
        modules = qc.get("modules") if isinstance(qc, dict) else None
    if modules is None:              # compressed in this process, not saved yet: the modules' own entries
        from .nn import CompressedLinear
        live = {n: m.config() for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
        if live:
            qc, modules = {}, live
    if not isinstance(modules, dict):
        raise TensorpressError(f"this model is not a tensorpress checkpoint and {NO_DATA}")
    if not any(isinstance(c, dict) and META_KEY in c for c in modules.values()):
        recipe = (qc.get("recipe") or {}).get("name") if isinstance(qc.get("recipe"), dict) else None
        raise TensorpressError(f"checkpoint{f' (recipe {recipe})' if recipe else ''} {NO_DATA}")
    prefix = layers_prefix(model)
    plans, settings, sorted_flags = [], None, set()
    for i, layer in enumerate(decoder_layers(model)):
        metas = {}
        for role, local in ROLE_NAMES.items():
            cfg = modules.get(f"{prefix}.{i}.{local}")
            meta = cfg.get(META_KEY) if isinstance(cfg, dict) else None
            if not isinstance(meta, dict):
                raise TensorpressError(f"incomplete UniQL metadata: {prefix}.{i}.{local} has no sorting data "
                                       f"(every linear of every block must be sorted)")
            if meta.get("version") != META_VERSION or meta.get("role") != role or meta.get("layer") != i:
                raise TensorpressError(f"bad UniQL metadata for {prefix}.{i}.{local} (version/role/layer)")
            metas[role] = meta
        q = metas["q"]
        d, nh, nkv = _int(q.get("head_dim"), "head_dim", 2), _int(q.get("n_heads"), "n_heads"), _int(
            q.get("n_kv_heads"), "n_kv_heads")
        inter = _int(metas["down"].get("intermediate_size"), "intermediate_size")
        if isinstance(layer.self_attn, ElasticAttention):
            raise TensorpressError("this model is already pruned (load the checkpoint again to choose another rate)")
        qp, kp, dp = layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj
        if (qp.out_features, kp.out_features, dp.in_features) != (nh * d, nkv * d, inter) or nh % nkv \
                or layer.self_attn.num_key_value_groups != nh // nkv:
            raise TensorpressError(f"UniQL metadata of block {i} does not match the model's shapes")
        try:
            order = torch.tensor(q.get("order"), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise TensorpressError(f"bad UniQL metadata: block {i} order is not an integer table") from None
        if tuple(order.shape) != (nkv, d):
            raise TensorpressError(f"bad UniQL metadata: block {i} order has shape {tuple(order.shape)}, "
                                   f"expected {(nkv, d)}")
        check_pair_layout(order)
        infl = q.get("influence")
        if infl is not None and (isinstance(infl, bool) or not isinstance(infl, (int, float)) or not math.isfinite(infl)):
            raise TensorpressError(f"bad UniQL metadata: block {i} influence {infl!r}")
        s = q.get("settings")
        if not isinstance(s, dict):
            raise TensorpressError(f"bad UniQL metadata: block {i} has no settings")
        settings = settings or s
        sorted_flags.add(bool(q.get("sorted")))
        plans.append(LayerPlan(i, d, nh, nkv, qp.in_features, inter, order, None if infl is None else float(infl)))
    _check_settings(settings, plans)
    return ElasticPlan(plans, settings, sorted_flags == {True})


def _check_settings(s: dict, layers: list[LayerPlan]) -> None:
    hg, mg = _int(s.get("head_grid"), "head_grid", 2), _int(s.get("mlp_grid"), "mlp_grid")
    for k in ("max_rate", "max_part_rate", "epsilon"):
        v = s.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < (math.inf if k == "epsilon" else 1):
            raise TensorpressError(f"bad UniQL metadata: {k} = {v!r}")
    if s.get("allocation") not in ("influence", "uniform"):
        raise TensorpressError(f"bad UniQL metadata: allocation {s.get('allocation')!r}")
    for l in layers:
        if hg % 2 or l.head_dim % hg or l.intermediate % mg:
            raise TensorpressError(f"bad UniQL metadata: grids {hg}/{mg} do not divide block {l.index}'s sizes")


# --- allocation ----------------------------------------------------------------------------------------

def check_rate(rate, max_rate: float | None = None) -> float:
    """A pruning rate in ``[0, max_rate]``, as a float; anything else is a one-line error."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise TensorpressError(f"prune rate must be a number in [0, {max_rate if max_rate is not None else 1}], "
                               f"got {rate!r}")
    hi = 1.0 if max_rate is None else max_rate
    if not 0 <= rate <= hi + 1e-12:
        raise TensorpressError(f"prune rate {rate} is outside [0, {hi:g}]" + (
            " (the largest rate this checkpoint was prepared for)" if max_rate is not None else ""))
    return float(rate)


def _entries(plan: ElasticPlan):
    """(full size, grid, weights per unit, influence, max steps) for attention and MLP of every layer."""
    s = plan.settings
    hg, mg, cap = s["head_grid"], s["mlp_grid"], float(s["max_part_rate"])
    out = []
    for l in plan.layers:
        for n, g, unit in ((l.head_dim, hg, l.attn_unit), (l.intermediate, mg, l.mlp_unit)):
            steps = n // g
            out.append((n, g, unit, l.influence, min(int(math.floor(cap * steps + 1e-9)), steps - 1)))
    return out


def allocate(plan: ElasticPlan, rate: float, allocation: str | None = None) -> Sizes:
    """Kept sizes per layer for a global pruning ``rate`` (fraction of the decoder linears' weights
    removed), renormalised so that the realised rate matches the request as closely as the grids allow."""
    rate = check_rate(rate, plan.max_rate)
    mode = allocation or plan.settings["allocation"]
    if mode not in ("influence", "uniform"):
        raise TensorpressError(f"allocation must be 'influence' or 'uniform', got {mode!r}")
    ents = _entries(plan)
    if mode == "influence" and any(e[3] is None for e in ents):
        mode = "uniform"                                # influence not measured: no preference
    P = [n * unit for n, g, unit, _, _ in ents]
    caps = [ms * g / n for n, g, unit, _, ms in ents]
    total = sum(P)
    target = rate * total
    if mode == "influence":
        eps = float(plan.settings["epsilon"])
        s0 = min(e[3] for e in ents)
        w = [math.exp(-(e[3] - s0) / eps) for e in ents]
    else:
        w = [1.0] * len(ents)
    feasible = sum(p * c for p, c in zip(P, caps))
    if target > feasible + 1e-9 * total:
        raise TensorpressError(f"prune rate {rate} is above what the per-layer caps allow "
                               f"({feasible / total:.3f} with max_part_rate {plan.settings['max_part_rate']})")

    def removed(c):
        return sum(p * min(cap, c * wi) for p, cap, wi in zip(P, caps, w))
    lo, hi = 0.0, 1.0
    while removed(hi) < target and hi < 1e300:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < target else (lo, mid)
    phi = [min(cap, hi * wi) if target > 0 else 0.0 for cap, wi in zip(caps, w)]
    want = [f * n / g for f, (n, g, _, _, _) in zip(phi, ents)]            # steps, continuous
    steps = [min(ms, max(0, int(round(x)))) for x, (_, _, _, _, ms) in zip(want, ents)]
    step_w = [g * unit for n, g, unit, _, _ in ents]
    cur = sum(s * sw for s, sw in zip(steps, step_w))
    while True:     # single grid steps, best fit to the target first, the largest rounding residual on ties
        best = None
        for k in range(len(ents)):
            for sign in (1, -1):
                if not 0 <= steps[k] + sign <= ents[k][4]:
                    continue
                new = cur + sign * step_w[k]
                gain = abs(cur - target) - abs(new - target)
                if gain <= 1e-9 * total:
                    continue
                key = (gain, sign * (want[k] - steps[k]), -k)
                if best is None or key > best[0]:
                    best = (key, k, sign, new)
        if best is None:
            break
        _, k, sign, cur = best
        steps[k] += sign
    attn, mlp = [], []
    for k, (n, g, _, _, _) in enumerate(ents):
        (attn if k % 2 == 0 else mlp).append(n - steps[k] * g)
    return Sizes(attn, mlp, rate, cur / total, {"allocation": mode})


def realised_rate(plan: ElasticPlan, sizes: Sizes) -> float:
    rem = sum((l.head_dim - a) * l.attn_unit + (l.intermediate - m) * l.mlp_unit
              for l, a, m in zip(plan.layers, sizes.attn, sizes.mlp))
    return rem / plan.total


def _check_sizes(plan: ElasticPlan, sizes: Sizes) -> None:
    hg, mg = plan.settings["head_grid"], plan.settings["mlp_grid"]
    if len(sizes.attn) != len(plan.layers) or len(sizes.mlp) != len(plan.layers):
        raise TensorpressError(f"kept sizes for {len(sizes.attn)} layers, the model has {len(plan.layers)}")
    for l, a, m in zip(plan.layers, sizes.attn, sizes.mlp):
        if not (0 < a <= l.head_dim and a % hg == 0 and 0 < m <= l.intermediate and m % mg == 0):
            raise TensorpressError(f"block {l.index}: kept sizes {a}/{m} are not positive multiples of the grids "
                                   f"{hg}/{mg} within {l.head_dim}/{l.intermediate}")


# --- slicing and masking -------------------------------------------------------------------------------

def _attn_indices(l: LayerPlan, keep: int):
    """(rows of each KV group in original channel numbering [n_kv, keep], q rows, k rows, v rows, o cols)."""
    d, n_rep = l.head_dim, l.n_heads // l.n_kv
    rows = kept_channels(l.order, keep)                                   # [n_kv, keep]
    q = torch.cat([h * d + rows[h // n_rep] for h in range(l.n_heads)])
    k = torch.cat([g * d + rows[g] for g in range(l.n_kv)])
    ar = torch.arange(keep)
    v = torch.cat([g * d + ar for g in range(l.n_kv)])
    o = torch.cat([h * d + ar for h in range(l.n_heads)])
    return rows, q, k, v, o


@torch.no_grad()
def apply_sizes(model: nn.Module, plan: ElasticPlan, sizes: Sizes) -> nn.Module:
    """Slice every block of the loaded (unsliced) model to ``sizes``, in place; returns the model."""
    _check_sizes(plan, sizes)
    layers = decoder_layers(model)
    for l, a, m in zip(plan.layers, sizes.attn, sizes.mlp):
        layer = layers[l.index]
        attn, mlp = layer.self_attn, layer.mlp
        rows, qr, kr, vr, oc = _attn_indices(l, a)
        dev = next(attn.parameters(), next(attn.buffers(), torch.empty(0))).device
        layer.self_attn = ElasticAttention(attn, slice_linear(attn.q_proj, rows=qr), slice_linear(attn.k_proj, rows=kr),
                                           slice_linear(attn.v_proj, rows=vr), slice_linear(attn.o_proj, cols=oc),
                                           rows.to(dev), a)
        keep = torch.arange(m)
        mlp.gate_proj = slice_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = slice_linear(mlp.up_proj, rows=keep)
        mlp.down_proj = slice_linear(mlp.down_proj, cols=keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = m
    model.tensorpress_pruning = {**sizes.to_dict(), "sorted": plan.sorted, "decoder_linear_weights": plan.total,
                                 **sizes.extra}
    return model


def apply_rate(model: nn.Module, rate: float, plan: ElasticPlan | None = None, allocation: str | None = None) -> Sizes:
    """Allocate and slice the loaded model for ``rate``; returns the kept sizes."""
    plan = plan or read_plan(model)
    sizes = allocate(plan, rate, allocation)
    apply_sizes(model, plan, sizes)
    return sizes


def _index_mask(n: int, kept: torch.Tensor) -> torch.Tensor:
    """Length-``n`` 0/1 mask with ones at ``kept``."""
    mask = torch.zeros(n)
    mask[kept] = 1
    return mask


def pruning_masks(plan: ElasticPlan, sizes: Sizes) -> dict[str, torch.Tensor]:
    """0/1 output masks, by module name inside the decoder layers' list (``"3.self_attn.q_proj"``), that
    zero exactly the channels :func:`apply_sizes` removes: q/k the dropped RoPE pairs, v the dropped
    V/O dims (their o columns then see zeros), up the dropped MLP channels (the gate is multiplied by
    them, down sees zeros)."""
    _check_sizes(plan, sizes)
    out = {}
    for l, a, m in zip(plan.layers, sizes.attn, sizes.mlp):
        _, qr, kr, vr, _ = _attn_indices(l, a)
        for local, n, idx in (("self_attn.q_proj", l.n_heads * l.head_dim, qr), ("self_attn.k_proj", l.n_kv * l.head_dim, kr),
                              ("self_attn.v_proj", l.n_kv * l.head_dim, vr), ("mlp.up_proj", l.intermediate, torch.arange(m))):
            out[f"{l.index}.{local}"] = _index_mask(n, idx)
    return out


def input_masks(plan: ElasticPlan, sizes: Sizes) -> dict[str, torch.Tensor]:
    """0/1 masks of the INPUT columns that see zeros under :func:`pruning_masks` (the columns
    :func:`apply_sizes` removes from ``o_proj`` and ``down_proj``), named as there."""
    _check_sizes(plan, sizes)
    out = {}
    for l, a, m in zip(plan.layers, sizes.attn, sizes.mlp):
        _, _, _, _, oc = _attn_indices(l, a)
        for local, n, idx in (("self_attn.o_proj", l.n_heads * l.head_dim, oc), ("mlp.down_proj", l.intermediate,
                                                                                    torch.arange(m))):
            out[f"{l.index}.{local}"] = _index_mask(n, idx)
    return out


def mask_sizes(model: nn.Module, plan: ElasticPlan, sizes: Sizes) -> list:
    """Apply :func:`pruning_masks` to the unsliced model as forward hooks (removable handles): the
    masked model computes what the sliced model computes (recovery fine-tuning trains through them)."""
    layers = decoder_layers(model)
    handles = []
    for name, mask in pruning_masks(plan, sizes).items():
        i, local = name.split(".", 1)
        mod = layers[int(i)].get_submodule(local)

        def hook(module, args, output, mask=mask):
            return output * mask.to(device=output.device, dtype=output.dtype)
        handles.append(mod.register_forward_hook(hook))
    return handles


# --- loading -------------------------------------------------------------------------------------------

def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         verify: bool = True, trust_remote_code: bool = False, prune_rate: float | None = None,
         allocation: str | None = None) -> nn.Module:
    """:func:`tensorpress.checkpoint.load`, then, with ``prune_rate``, slice a UniQL-sorted checkpoint
    to that rate (fraction of the decoder linears' weights removed, in ``[0, max_rate]``): allocation
    from the stored block influences, every layer sliced, head dims and RoPE adjusted, no calibration.
    ``model.tensorpress_pruning`` records the kept sizes and the realised rate."""
    from .checkpoint import load as _load
    if prune_rate is not None:
        check_rate(prune_rate)                          # a bad number fails before any tensor is read
    model = _load(path, device=device, dtype=dtype, verify=verify, trust_remote_code=trust_remote_code)
    if prune_rate is None:
        return model
    plan = read_plan(model)
    apply_rate(model, prune_rate, plan, allocation)
    return model
