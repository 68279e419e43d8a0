"""Apply a recipe to a model, block by block (calibration → compressor → compressed module).

For each decoder block: hook its target linears, run the block over the calibration inputs to
collect the statistics every stage asked for (always the Gram, which also gives the per-layer
error), run each linear's stages in recipe order, swap the compressed modules in, let stages with a
``finish_block`` hook adjust the block (SVDQuant folds its smoothing into the norms), and run the
block again so that the next block sees the compressed block's outputs (or, with
``stats_source: dense``, keep a dense stream for the statistics, as ARMOR and SVD-LLM do).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..calib import distributed as dist
from ..calib.collectors import InputCollector, LinearStats, collect_fisher
from ..calib.pipeline import capture, release_memory, release_pages, run_block
from ..errors import TensorpressError
from ..evaluate import peak_rss_bytes
from ..modeling import decoder_layers, layers_prefix, set_submodule, target_linears
from .base import LinearContext


@dataclass
class LayerRecord:
    name: str
    methods: list[str]
    rel_error: float          # ‖X(W − Ŵ)ᵀ‖_F / ‖X Wᵀ‖_F on the calibration inputs
    seconds: float
    peak_rss_mb: float
    module: dict = field(default_factory=dict)

    def to_dict(self):
        return {"name": self.name, "methods": self.methods, "rel_error": self.rel_error,
                "seconds": round(self.seconds, 4), "peak_rss_mb": round(self.peak_rss_mb, 1), "module": self.module}


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W.double() - W_hat.double())
    num = torch.einsum("oi,ij,oj->", D, H, D)
    den = torch.einsum("oi,ij,oj->", W.double(), H, W.double())
    return float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())


def plan(model: nn.Module, recipe) -> dict[str, list]:
    """Stages per full module name, validated against every layer before any work starts."""
    prefix = layers_prefix(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in target_linears(layer).items():
            full = f"{prefix}.{i}.{name}"
            stages = recipe.stages_for(full)
            if not stages:
                continue
            if not isinstance(mod, nn.Linear):
                raise TensorpressError(f"{full} is already compressed; compress a dense model")
            dummy = LinearContext(full, mod, mod, LinearStats(mod.in_features))
            for s in stages:
                s.compressor.check_layer(dummy)
            out[full] = stages
    if not out:
        raise TensorpressError(f"recipe {recipe.name} matches no linear of the model")
    return out


def _needs(stages_by_name: dict, full: str) -> set[str]:
    return {"gram"} | set().union(*(s.compressor.requires for s in stages_by_name[full]))


def _with_fisher(stats: LinearStats, fisher: dict | None, full: str) -> LinearStats:
    if fisher is not None and full in fisher:
        stats.fisher_in, stats.fisher_out = fisher[full].fisher_in, fisher[full].fisher_out
    return stats


def _full_linears(layers, prefix: str) -> dict[str, nn.Module]:
    """Every target linear of the decoder blocks by its full module name."""
    return {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in target_linears(layer).items()}


def _last_block(stages_by_name: dict, prefix: str) -> int:
    """Index of the last decoder block with a linear to compress."""
    return max(int(n[len(prefix) + 1:].split(".")[0]) for n in stages_by_name)


def _has(stages: list, stage) -> bool:
    return any(x is stage for x in stages)


def _budget_stages(recipe, stages_by_name) -> list:
    used = {id(s) for stages in stages_by_name.values() for s in stages}
    return [s for s in recipe.stages if id(s) in used and getattr(s.compressor, "needs_allocation", False)]


def allocate_budgets(model: nn.Module, recipe, stages_by_name: dict, cap, fisher: dict | None,
                     progress: bool = True) -> dict[str, dict[str, int]]:
    """Ranks for every stage with a ``budget`` (see :mod:`.budget`); returns
    ``{"<k>:<method>": {linear: rank}}`` (``k`` counts the budgeted stages in recipe order).

    ``sensitivity`` allocation runs the dense model over the calibration batches once more, block by
    block, and measures each targeted linear's spectrum in the stage's own metric (statistics are
    dropped as soon as a block is measured, so memory stays one block's).
    """
    from .budget import LayerShape
    stages = _budget_stages(recipe, stages_by_name)
    if not stages:
        return {}
    prefix = layers_prefix(model)
    layers = decoder_layers(model)
    mods = _full_linears(layers, prefix)
    spectra: dict[int, dict[str, torch.Tensor]] = {id(s): {} for s in stages}
    sens = [s for s in stages if s.compressor.needs_sensitivity]
    for s in sens:
        for full, ss in stages_by_name.items():
            if _has(ss, s) and ss[0] is not s:
                raise TensorpressError(f"allocation 'sensitivity' needs '{s.compressor.name}' to be the first stage "
                                       f"of every linear it targets ({full} has '{ss[0].compressor.name}' before it)")
    if sens:
        hidden = list(cap.hidden)
        last = _last_block(stages_by_name, prefix)
        for i, layer in enumerate(tqdm(layers[:last + 1], desc="sensitivity", unit="block", disable=not progress,
                                       leave=False)):
            calls = [c[i] for c in cap.calls]
            targets = {n: m for n, m in target_linears(layer).items()
                       if any(_has(stages_by_name.get(f"{prefix}.{i}.{n}", []), s) for s in sens)}
            if not targets:
                hidden = run_block(layer, hidden, calls, inplace=True)
                continue
            needs = {n: _needs(stages_by_name, f"{prefix}.{i}.{n}") for n in targets}
            with InputCollector(targets, needs, batch_offset=dist.batch_offset(), prefix=f"{prefix}.{i}.") as col:
                hidden = run_block(layer, hidden, calls, after_batch=col.next_batch, inplace=True)
            dist.all_reduce_stats(col.stats, col.sample_rows)     # distributed: all ranks' tokens (no-op otherwise)
            release_memory()
            for n, m in targets.items():
                full = f"{prefix}.{i}.{n}"
                ctx = LinearContext(full, m, m, _with_fisher(col.stats[n], fisher, full))
                for s in sens:
                    if _has(stages_by_name.get(full, []), s):
                        # distributed: rank 0's spectrum, so every rank allocates the same ranks
                        spectra[id(s)][full] = dist.broadcast_(s.compressor.spectrum(ctx).float())
            del col
    out = {}
    for k, s in enumerate(stages):
        comp = s.compressor
        shapes = []
        for full, ss in stages_by_name.items():
            if _has(ss, s):
                m = mods[full]
                ctx = LinearContext(full, m, m, LinearStats(m.in_features))
                shapes.append(LayerShape(full, m.out_features, m.in_features, comp.factor_bits(ctx)))
        out[f"{k}:{comp.name}"] = comp.allocate(shapes, spectra[id(s)])
    return out


@dataclass
class Job:
    """Everything a block needs to be compressed: the validated plan and the shared inputs."""
    recipe: object
    stages_by_name: dict
    prefix: str
    dense: bool                        # statistics from the dense stream (ARMOR, SVD-LLM) or the compressed one
    last: int                          # index of the last block with a linear to compress
    fisher: dict | None = None
    log_file: object = None
    on_record: object = None
    bar: object = None


def prepare(model: nn.Module, recipe, samples: torch.Tensor, *, stats_source: str | None = None,
            fisher: dict | None = None, progress: bool = True) -> Job:
    """Validate the recipe against every layer and compute what precedes the block loop (the Fisher
    information for stages that need it)."""
    stats_source = stats_source or recipe.calibration["stats_source"]
    stages_by_name = plan(model, recipe)
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    fisher_names = [n for n, ss in stages_by_name.items() if any("fisher" in s.compressor.requires for s in ss)]
    if fisher_names and fisher is None:
        all_mods = _full_linears(layers, prefix)
        with torch.enable_grad():
            fisher = collect_fisher(model, samples, {n: all_mods[n] for n in fisher_names},
                                    batch_size=1, progress=progress)
        dist.all_reduce_stats(fisher)      # distributed: sum over every rank's samples (no-op otherwise)
    missing = [n for n in fisher_names if fisher is None or n not in fisher]
    if missing:
        raise TensorpressError(f"no Fisher information given for {missing[0]}")
    return Job(recipe, stages_by_name, prefix, stats_source == "dense", _last_block(stages_by_name, prefix), fisher)


@torch.no_grad()
def compress_block(job: Job, i: int, layer: nn.Module, hidden: list, calls: list) -> list[LayerRecord]:
    """Compress the target linears of decoder block ``i`` in place and advance ``hidden`` (in place) to
    the block's outputs, the next block's inputs: the compressed block's, or with dense statistics
    the dense block's (computed by the statistics pass itself). Returns the block's records."""
    prefix, stages_by_name = job.prefix, job.stages_by_name
    targets = {n: m for n, m in target_linears(layer).items() if f"{prefix}.{i}.{n}" in stages_by_name}
    if not targets:
        run_block(layer, hidden, calls, inplace=True)
        return []
    needs = {n: _needs(stages_by_name, f"{prefix}.{i}.{n}") for n in targets}
    with InputCollector(targets, needs, batch_offset=dist.batch_offset(), prefix=f"{prefix}.{i}.") as col:
        # dense: this pass's outputs are the next inputs; compressed: they are recomputed
        # after compression, so the statistics pass drops them
        run_block(layer, hidden, calls, after_batch=col.next_batch, keep=job.dense, inplace=True)
    dist.all_reduce_stats(col.stats, col.sample_rows)   # distributed: statistics of all ranks' batches (no-op otherwise)
    # Hook: a stage with ``prepare_block`` first sees the contexts of all the block's linears it
    # targets (SVDQuant fits one smoothing vector per group of linears that read the same input).
    for stage in {id(s): s for n in targets for s in stages_by_name[f"{prefix}.{i}.{n}"]}.values():
        if hasattr(stage.compressor, "prepare_block"):
            stage.compressor.prepare_block({f"{prefix}.{i}.{n}": LinearContext(f"{prefix}.{i}.{n}", m, m, col.stats[n])
                                            for n, m in targets.items()
                                            if _has(stages_by_name[f"{prefix}.{i}.{n}"], stage)})
    records = []
    for name, mod in targets.items():
        full = f"{prefix}.{i}.{name}"
        t0 = time.perf_counter()
        ctx = LinearContext(full, mod, mod, _with_fisher(col.stats[name], job.fisher, full))
        for stage in stages_by_name[full]:
            ctx.current = stage.compressor.compress(ctx)
        new = dist.broadcast_module(ctx.current)     # distributed: rank 0's module on every rank (no-op otherwise)
        W = mod.weight.detach().float()
        W_hat = new.effective_weight() if hasattr(new, "effective_weight") else new.weight.float()
        if not bool(torch.isfinite(W_hat).all()):
            raise TensorpressError(f"{full}: compression produced non-finite weights")
        err = output_error(W, W_hat, col.stats[name].gram_sum)   # a ratio: the sum serves, no fp64 copy
        set_submodule(layer, name, new)
        release_pages([mod.weight, mod.bias])     # the dense weight is not read again (see release_pages)
        rec = LayerRecord(full, [s.compressor.name for s in stages_by_name[full]], err,
                          time.perf_counter() - t0, peak_rss_bytes() / 2**20,
                          new.config() if hasattr(new, "config") else {})
        records.append(rec)
        if job.log_file is not None:
            job.log_file.write(json.dumps(rec.to_dict()) + "\n")
            job.log_file.flush()
        if job.on_record is not None:
            job.on_record(rec)
        if job.bar is not None:
            job.bar.set_postfix_str(f"{name} err={err:.4f}")
            job.bar.update(1)
    del col
    finish_block(job, i, layer, targets)
    if i < job.last and not job.dense:
        run_block(layer, hidden, calls, inplace=True)
    release_memory()
    return records


def _block_tensor(layer: nn.Module, name: str) -> torch.Tensor:
    mod, _, leaf = name.rpartition(".")
    owner = layer.get_submodule(mod) if mod else layer
    t = owner._parameters.get(leaf)
    return owner._buffers[leaf] if t is None else t


def finish_block(job: Job, i: int, layer: nn.Module, targets: dict) -> None:
    """Hook: a stage with ``finish_block(layer, names)`` sees block ``i`` once its linears are replaced
    (``names``: the block's linears whose module in place it produced, i.e. it is their last stage)
    and may change other tensors of the block, e.g. SVDQuant folds its smoothing vectors into the
    preceding norms. It runs before the block goes forward for the next block's inputs (and before
    the streaming runner writes the block's shard). It returns the names of the tensors it changed;
    distributed, rank 0's values of those go to every rank (as :func:`dist.broadcast_module` does for
    the linears), so all ranks run and store the same block."""
    prefix, stages_by_name = job.prefix, job.stages_by_name
    stages = {id(s): s for n in targets for s in stages_by_name[f"{prefix}.{i}.{n}"]}.values()
    for stage in stages:
        if not hasattr(stage.compressor, "finish_block"):
            continue
        names = [n for n in targets if stages_by_name[f"{prefix}.{i}.{n}"][-1] is stage]
        if not names:
            continue
        for t in stage.compressor.finish_block(layer, names):
            dist.broadcast_(_block_tensor(layer, t).data)


@torch.no_grad()
def compress_model(model: nn.Module, recipe, samples: torch.Tensor, *, batch_size: int | None = None,
                   stats_source: str | None = None, progress: bool = True, log_file=None,
                   on_record=None, fisher: dict[str, LinearStats] | None = None) -> list[LayerRecord]:
    """Compress ``model`` in place with ``recipe`` on calibration token windows ``samples [n, L]``.

    Returns one :class:`LayerRecord` per compressed linear; each is also written as a JSON line to
    ``log_file`` and passed to ``on_record`` as soon as the linear is done. Stages that need the
    Fisher information (FWSVD) get it from backward passes of the LM loss over ``samples`` on the
    dense model before anything is compressed, unless ``fisher`` (from
    :func:`tensorpress.calib.collectors.collect_fisher`) is given. (:mod:`.streaming` runs the same
    blocks from weights on disk, one block in memory at a time, with resume.) A UniQL stage with
    ``recovery`` runs three passes instead (:mod:`.recovery`: sort, masked fine-tuning, quantise).
    """
    from .recovery import compress_with_recovery, recovery_stage
    if recovery_stage(recipe) is not None:       # UniQL + masked recovery: sort, fine-tune, quantise
        return compress_with_recovery(model, recipe, samples, compress=compress_model, batch_size=batch_size,
                                      stats_source=stats_source, progress=progress, log_file=log_file,
                                      on_record=on_record)
    batch_size = batch_size or recipe.calibration["batch_size"]
    job = prepare(model, recipe, samples, stats_source=stats_source, fisher=fisher, progress=progress)
    job.log_file, job.on_record = log_file, on_record
    layers = decoder_layers(model)
    cap = capture(model, samples, batch_size)
    allocate_budgets(model, recipe, job.stages_by_name, cap, job.fisher, progress)
    # With dense statistics, every block's inputs come from the dense stream alone: the compressed
    # model's activations are never needed, so only one stream (one pass per block) is run.
    hidden = cap.hidden                # updated in place, block by block
    job.bar = tqdm(total=len(job.stages_by_name), desc=f"compress [{recipe.name}]", unit="linear", disable=not progress)
    records: list[LayerRecord] = []
    for i, layer in enumerate(layers):
        if i > job.last:
            break                      # nothing left to compress: later outputs are not needed
        records += compress_block(job, i, layer, hidden, [c[i] for c in cap.calls])
    job.bar.close()
    return records
