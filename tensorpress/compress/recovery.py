"""Masked recovery fine-tuning of UniQL-sorted models (docs: lowrank-quant.md §7.8).

A UniQL stage with ``recovery: {...}`` runs in three phases over the whole model (the only stage of
its recipe; :func:`compress_with_recovery`, called by :func:`.apply.compress_model`):

1. **Sort** every block (the UniQL stage with ``quantizer: none``): dense weights in the sorted
   layout plus each module's sorting metadata.
2. **Fine-tune** LoRA adapters (r 8, α 16, dropout 0.05 on q/k/v/o/gate/up/down by default) on the
   calibration sequences with the next-token loss, every step at one global pruning rate drawn from
   ``rates`` with probability ∝ ``exp(−0.1·i)`` (``i`` the index in ascending *keep*-ratio order: more
   pruning is more likely), the model masked at that rate by
   :func:`tensorpress.elastic.mask_sizes` — by construction exactly the channels the loader removes
   (the reference's q/k masks differ from its slicing; these do not). A held-out share of the
   sequences scores every epoch (mean masked loss over up to 4 of the ``rates``, largest to
   smallest: :func:`scoring_rates`) and the best epoch's adapters, or none when no epoch beats the
   sorted model, are merged into the weights.
3. **Quantise** the fine-tuned sorted weights with the stage's quantiser on fresh statistics of the
   fine-tuned model, keeping the phase-1 sorting metadata (orders, block influences): the UniQL
   compressor's ``presorted`` mode.

The reference trains on alpaca-cleaned for 5 epochs (batch 32); offline, the calibration sequences
are what a run has, so the defaults are small (``epochs`` 2, batch 4, ``holdout`` 1/8) and the
result is only kept when the held-out loss says it helped.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..elastic import ROLE_NAMES as _ROLES
from ..errors import TensorpressError
from ..modeling import decoder_layers, layers_prefix, set_submodule
from .base import check_number

ROLE_NAMES = tuple(_ROLES.values())     # the seven linears of a block, as the loader names them


@dataclass
class RecoverySettings:
    epochs: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 1e-4
    batch_size: int = 4
    warmup: float = 0.1                  # fraction of the steps with a linear learning-rate warm-up
    holdout: float = 0.125               # fraction of the calibration sequences held out (best epoch)
    rates: list | None = None            # global pruning rates to train at; None: 0.05 … max_rate, step 0.05
    seed: int = 0

    @classmethod
    def parse(cls, d) -> "RecoverySettings":
        """From a recipe's ``recovery`` mapping; a clear :class:`TensorpressError` for bad values."""
        if not isinstance(d, dict):
            raise TensorpressError(f"recovery must be a mapping of settings, got {d!r}")
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise TensorpressError(f"unknown recovery setting(s) {', '.join(bad)}; valid: {', '.join(sorted(names))}")
        s = cls(**d)
        check_number("recovery.epochs", s.epochs, 1, 1000, integer=True)
        check_number("recovery.rank", s.rank, 1, integer=True)
        check_number("recovery.alpha", s.alpha, 0, lo_open=True)
        check_number("recovery.dropout", s.dropout, 0, 1, hi_open=True)
        check_number("recovery.lr", s.lr, 0, 1, lo_open=True)
        check_number("recovery.batch_size", s.batch_size, 1, integer=True)
        check_number("recovery.warmup", s.warmup, 0, 1)
        check_number("recovery.holdout", s.holdout, 0, 1, lo_open=True, hi_open=True)
        check_number("recovery.seed", s.seed, 0, integer=True)
        if s.rates is not None:
            if not isinstance(s.rates, list) or not s.rates:
                raise TensorpressError(f"recovery.rates must be a non-empty list of rates, got {s.rates!r}")
            for r in s.rates:
                check_number("recovery.rates entry", r, 0, 1, hi_open=True)
        return s

    def to_dict(self) -> dict:
        return asdict(self)


def training_rates(settings: RecoverySettings, max_rate: float) -> list[float]:
    """The rates to train at, largest first (ascending keep ratio), each within ``[0, max_rate]``."""
    if settings.rates is None:
        rates = [round(0.05 * k, 10) for k in range(1, int(max_rate / 0.05 + 1e-9) + 1)] or [max_rate]
    else:
        rates = [float(r) for r in settings.rates]
        over = [r for r in rates if r > max_rate + 1e-12]
        if over:
            raise TensorpressError(f"recovery.rates {over} exceed the stage's max_rate {max_rate}")
    return sorted(set(rates), reverse=True)


def scoring_rates(rates: list[float], most: int = 4) -> list[float]:
    """The rates the held-out loss is measured at: all of them, or ``most`` spread evenly from the
    largest to the smallest (each evaluation is a forward pass per held-out sequence per rate)."""
    if len(rates) <= most:
        return list(rates)
    return [rates[round(k * (len(rates) - 1) / (most - 1))] for k in range(most)]


def rate_weights(n: int) -> torch.Tensor:
    """Sampling probabilities ∝ exp(−0.1·i) for rates in ascending keep-ratio order (docs §7.8)."""
    w = torch.exp(-0.1 * torch.arange(n, dtype=torch.float64))
    return w / w.sum()


class LoRALinear(nn.Module):
    """``base(x) + (α/r)·B·A·dropout(x)`` with ``A`` Kaiming-uniform and ``B = 0`` (an exact no-op at
    the start). The adapters are fp32; the base module is frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = alpha / rank
        self.dropout = dropout
        bound = 1.0 / math.sqrt(self.in_features)          # kaiming_uniform_(a=√5) on a [r, in] matrix
        A = (torch.rand(rank, self.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        dev = base.weight.device
        self.lora_A = nn.Parameter(A.float().to(dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))

    def forward(self, x):
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        d = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return self.base(x) + d.to(x.dtype)

    def delta(self) -> torch.Tensor:
        return (self.lora_B.detach().double() @ self.lora_A.detach().double()) * self.scale


def _wrap(model: nn.Module, s: RecoverySettings) -> dict[str, LoRALinear]:
    gen = torch.Generator().manual_seed(s.seed)
    prefix, out = layers_prefix(model), {}
    for i, layer in enumerate(decoder_layers(model)):
        for local in ROLE_NAMES:
            w = LoRALinear(layer.get_submodule(local), s.rank, s.alpha, s.dropout, gen)
            set_submodule(layer, local, w)
            out[f"{prefix}.{i}.{local}"] = w
    return out


def trained_columns(plan, sizes_by_rate: dict) -> dict[str, torch.Tensor]:
    """Per ``o_proj`` / ``down_proj`` (names as in :func:`tensorpress.elastic.input_masks`): the input
    columns live at some training rate. The others only ever saw zeros, so their adapter columns
    ``A[:, j]`` never moved from the random init and ``B·A[:, j]`` would be untrained noise: the merge
    leaves them out. (Rows need no such care: a masked output row's ``B`` row gets no gradient.)"""
    from .. import elastic
    out: dict[str, torch.Tensor] = {}
    for sizes in sizes_by_rate.values():
        for n, m in elastic.input_masks(plan, sizes).items():
            out[n] = m if n not in out else torch.maximum(out[n], m)
    return out


def _unwrap(model: nn.Module, wrapped: dict[str, LoRALinear], state: dict | None,
            columns: dict[str, torch.Tensor] | None = None) -> None:
    """Put the base modules back, with ``state``'s adapters (``None``: none) merged into their weights,
    ``columns`` (:func:`trained_columns`) masking the merged input columns."""
    prefix = layers_prefix(model)
    layers = decoder_layers(model)
    for name, w in wrapped.items():
        i, local = name[len(prefix) + 1:].split(".", 1)
        if state is not None:
            w.lora_A.data.copy_(state[name][0])
            w.lora_B.data.copy_(state[name][1])
            d = w.delta()
            keep = (columns or {}).get(f"{i}.{local}")
            if keep is not None:
                d = d * keep.to(d)[None, :]
            with torch.no_grad():
                w.base.weight.data.copy_((w.base.weight.double() + d).to(w.base.weight.dtype))
        set_submodule(layers[int(i)], local, w.base)


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def _eval_loss(model, plan, sizes_by_rate: dict, val: torch.Tensor, batch_size: int) -> float:
    from .. import elastic
    total = 0.0
    for rate, sizes in sizes_by_rate.items():
        handles = elastic.mask_sizes(model, plan, sizes)
        try:
            for j in range(0, len(val), batch_size):
                b = val[j:j + batch_size]
                total += float(_loss(model, b)) * len(b)
        finally:
            for h in handles:
                h.remove()
    return total / (len(val) * len(sizes_by_rate))


def masked_finetune(model: nn.Module, plan, samples: torch.Tensor, settings: RecoverySettings,
                    progress: bool = True) -> dict:
    """Phase 2 on a sorted, unsliced model with its :class:`tensorpress.elastic.ElasticPlan`: trains the
    adapters under the plan's masks, keeps the best epoch by held-out loss and merges it into the
    weights (a failure leaves the weights untouched). Returns a report (losses per epoch, kept epoch)."""
    from .. import elastic
    rates = training_rates(settings, plan.max_rate)
    probs = rate_weights(len(rates))
    sizes = {r: elastic.allocate(plan, r) for r in rates}
    scored = {r: sizes[r] for r in scoring_rates(rates)}
    n_val = max(1, round(len(samples) * settings.holdout))
    if len(samples) - n_val < 1:
        raise TensorpressError(f"recovery needs at least 2 calibration sequences (got {len(samples)})")
    gen = torch.Generator().manual_seed(settings.seed)
    perm = torch.randperm(len(samples), generator=gen)
    val, train = samples[perm[:n_val]], samples[perm[n_val:]]
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warm = int(settings.warmup * total)

    was_training = model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = _wrap(model, settings)
    params = [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) if warm and k < warm else max(0.0, (total - k) / max(1, total - warm)))
    report = {"settings": settings.to_dict(), "rates": rates, "scored_rates": list(scored), "train_sequences": len(train),
              "heldout_sequences": n_val, "steps": total, "epochs": []}
    best_state, state_of = None, lambda: {n: (w.lora_A.detach().clone(), w.lora_B.detach().clone())
                                          for n, w in wrapped.items()}
    try:
        model.eval()
        best = _eval_loss(model, plan, scored, val, settings.batch_size)
        report["heldout_loss_before"] = best
        bar = tqdm(total=total, desc="recovery fine-tuning", unit="step", disable=not progress)
        for epoch in range(settings.epochs):
            for w in wrapped.values():
                w.train()                                  # adapter dropout only: the base stays in eval
            order = torch.randperm(len(train), generator=gen)
            losses = []
            for j in range(0, len(train), settings.batch_size):
                rate = rates[int(torch.multinomial(probs, 1, generator=gen))]
                handles = elastic.mask_sizes(model, plan, sizes[rate])
                try:
                    with torch.enable_grad():
                        loss = _loss(model, train[order[j:j + settings.batch_size]])
                        if not torch.isfinite(loss):
                            raise TensorpressError(f"recovery fine-tuning diverged (loss {float(loss)} at rate {rate}); "
                                                   f"lower recovery.lr")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    opt.step()
                    sched.step()
                finally:
                    for h in handles:
                        h.remove()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", rate=rate)
            for w in wrapped.values():
                w.eval()
            held = _eval_loss(model, plan, scored, val, settings.batch_size)
            report["epochs"].append({"train_loss": sum(losses) / len(losses), "heldout_loss": held})
            if held < best:
                best, best_state = held, state_of()
                report["kept_epoch"] = epoch + 1
        bar.close()
    except BaseException:
        _unwrap(model, wrapped, None)                      # leave the sorted model as it was
        raise
    else:
        report.setdefault("kept_epoch", 0)                  # 0: no epoch beat the sorted model
        report["heldout_loss_after"] = best
        _unwrap(model, wrapped, best_state, trained_columns(plan, sizes))
    finally:
        for n, p in model.named_parameters():              # the model's own names again (unwrapped)
            p.requires_grad_(grads.get(n, False))
        model.train(was_training)
    return report


# --- the three phases ------------------------------------------------------------------------------

def recovery_stage(recipe):
    """The recipe's UniQL stage with recovery settings, or ``None``; a clear error when the recipe
    combines it with other stages (phase 2 trains the whole model between two block-wise passes)."""
    with_rec = [s for s in recipe.stages if getattr(s.compressor.params, "recovery", None) is not None]
    if not with_rec:
        return None
    if len(recipe.stages) != 1:
        raise TensorpressError(f"recipe {recipe.name}: a UniQL stage with recovery fine-tuning must be the recipe's "
                               f"only stage (it trains the whole sorted model between sorting and quantisation)")
    return with_rec[0]


def _phase_recipe(recipe, **params):
    from ..recipe import Recipe
    d = copy.deepcopy(recipe.to_dict())
    d["stages"][0].update(params)
    d["stages"][0]["recovery"] = None
    return Recipe.from_dict(d, recipe.name)


def compress_with_recovery(model: nn.Module, recipe, samples: torch.Tensor, *, compress, progress: bool = True,
                           log_file=None, on_record=None, **kw) -> list:
    """Sort → masked LoRA fine-tuning → quantise (module docstring). ``compress`` is
    :func:`.apply.compress_model` (passed in: the pipeline is not imported here). Returns the records
    of the quantisation pass; ``model.tensorpress_recovery`` holds the fine-tuning report."""
    from .. import elastic
    from ..calib import distributed as dist
    from ..nn.elastic import META_KEY, SortedDenseLinear
    if dist.active():
        raise TensorpressError("recovery fine-tuning runs in one process; launch it without torchrun")
    stage = recovery_stage(recipe)
    settings = RecoverySettings.parse(stage.compressor.params.recovery)
    compress(model, _phase_recipe(recipe, quantizer="none"), samples, progress=progress, **kw)   # records: not kept
    # plain linears again (the sorted weights), their metadata kept aside for the quantisation pass
    metas = {}
    prefix = layers_prefix(model)
    for i, layer in enumerate(decoder_layers(model)):
        for local in ROLE_NAMES:
            m = layer.get_submodule(local)
            if not isinstance(m, SortedDenseLinear):
                raise TensorpressError(f"recovery: {prefix}.{i}.{local} was not sorted")
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.weight.dtype,
                            device=m.weight.device)
            lin.weight.data.copy_(m.weight.data)
            if m.bias is not None:
                lin.bias.data.copy_(m.bias.data)
            lin.weight.requires_grad_(False)
            metas[f"{prefix}.{i}.{local}"] = m.config()[META_KEY]
            set_submodule(layer, local, lin)
    plan = elastic.read_plan(model, {n: {META_KEY: meta} for n, meta in metas.items()})
    report = masked_finetune(model, plan, samples, settings, progress)
    final = _phase_recipe(recipe)                      # the stage's own quantiser, on the fine-tuned weights
    final.stages[0].compressor.presorted = metas
    records = compress(model, final, samples, progress=progress, log_file=log_file, on_record=on_record, **kw)
    model.tensorpress_recovery = report
    return records
