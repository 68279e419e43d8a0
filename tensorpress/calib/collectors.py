"""Streaming statistics of the inputs of target linears (the one Gram collector).

Statistics, by the names compressors ask for:

* ``gram``       — ``H = (1/N) Σ x xᵀ`` over all N calibration tokens: an exact average (the sum is
  kept in fp64, each batch's ``XᵀX`` computed in fp32), not a decayed running mean.
* ``input_norm`` — ``‖X_j‖₂`` per input channel (Wanda's activation norm).
* ``abs_mean``   — ``mean_t |x_tj|`` per input channel (ASVD).
* ``abs_max``    — ``max_t |x_tj|`` per input channel (smoothing).
* ``input_sample`` — a uniform random subsample of at most ``sample_rows`` input rows (tokens), fp32
  ``[≤ sample_rows, in]``, for objectives that are not quadratic in the inputs (SVDQuant scores
  activation-quantised outputs). Memory is bounded: ``sample_rows · in · 4`` bytes per linear (default
  4096 rows: 9 MB at in = 576, 25 MB at in = 1536), whatever the number of calibration tokens. Each row
  gets a random fp64 key and the ``sample_rows`` smallest keys are kept, rows in calibration order
  (reservoir sampling by priorities), so the sample is uniform over all tokens and reproducible; linears
  that read the same tensor get the same keys, hence the same rows. A row's key depends only on
  ``(seed, global batch index, position in the batch)`` (one generator per batch), never on which process
  saw the batch: distributed ranks that each see some batches (``batch_offset``) and merge their samples
  by smallest keys (:func:`tensorpress.calib.distributed.all_reduce_stats`) get the single-process sample.
* ``fisher``     — squared per-sequence gradients of the LM loss w.r.t. the weight, summed over
  samples and reduced per input column and per output row (FWSVD). Needs backward passes; see
  :func:`collect_fisher`.

Linears that read the same tensor (q/k/v, gate/up) share one computation per batch. With
``input_sample``, ``stats.extra["input_group"]`` labels the tensor a linear read in the first
batch: linears with equal labels share an input (what SVDQuant uses to share one smoothing vector).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import TensorpressError

FORWARD_STATS = frozenset({"gram", "input_norm", "abs_mean", "abs_max", "input_sample"})
SAMPLE_ROWS = 4096
ALL_STATS = FORWARD_STATS | {"fisher"}


@dataclass
class LinearStats:
    """Accumulated statistics of one linear's inputs."""
    in_features: int
    n_tokens: int = 0
    gram_sum: torch.Tensor | None = None       # fp64 [in, in]
    sq_sum: torch.Tensor | None = None         # fp64 [in]
    abs_sum: torch.Tensor | None = None        # fp64 [in]
    abs_max: torch.Tensor | None = None        # fp32 [in]
    sample: torch.Tensor | None = None         # fp32 [≤ sample_rows, in]  (input_sample)
    sample_keys: torch.Tensor | None = None    # fp64 [≤ sample_rows]      their random priorities
    fisher_in: torch.Tensor | None = None      # fp64 [in]   Σ over rows of squared grads
    fisher_out: torch.Tensor | None = None     # fp64 [out]  Σ over columns
    extra: dict = field(default_factory=dict)

    def gram(self, dtype=torch.float64) -> torch.Tensor:
        if self.gram_sum is None:
            raise KeyError("gram was not collected")
        return (self.gram_sum / max(self.n_tokens, 1)).to(dtype)

    def input_norm(self) -> torch.Tensor:
        if self.sq_sum is not None:
            return self.sq_sum.sqrt().float()
        if self.gram_sum is not None:
            return self.gram_sum.diagonal().clamp_min(0).sqrt().float()
        raise KeyError("input_norm was not collected")

    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise KeyError("abs_mean was not collected")
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    def input_sample(self) -> torch.Tensor:
        if self.sample is None:
            raise KeyError("input_sample was not collected")
        return self.sample


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise TensorpressError(f"non-finite (NaN/Inf) calibration activations at the input of {name}")


class InputCollector:
    """Forward hooks on a set of linears, accumulating the requested statistics of their inputs.

    ``batch_offset`` is the global index of the first batch this collector sees (a distributed rank's
    first calibration batch; 0 in a single process): ``input_sample`` keys are drawn from a generator
    seeded by ``(seed, global batch index)``.
    """

    def __init__(self, modules: dict[str, nn.Module], needs: dict[str, set[str]], sample_rows: int = SAMPLE_ROWS,
                 seed: int = 0, batch_offset: int = 0, prefix: str = ""):
        self.modules = modules
        self.prefix = prefix          # prepended to linear names in error messages (e.g. "model.layers.3.")
        self.needs = {n: set(needs.get(n, ())) & FORWARD_STATS for n in modules}
        self.stats = {n: LinearStats(m.in_features) for n, m in modules.items()}
        self.sample_rows = sample_rows
        self.seed, self.batch_offset = seed, batch_offset
        self._gen = None              # this batch's key generator, made on first use
        self._handles: list = []
        self._memo: dict = {}
        self._groups: dict = {}       # first-batch input tensor -> label (input_group)
        self._batch = 0

    def __enter__(self):
        for name, mod in self.modules.items():
            if self.needs[name]:
                self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._memo.clear()

    def _hook(self, name):
        def hook(mod, inputs, output):
            self._accumulate(name, inputs[0])
        return hook

    def _compute(self, x: torch.Tensor, what: str) -> torch.Tensor:
        # Shared per input tensor within one batch: q/k/v (and gate/up) read the same x. The memo
        # keeps x alive: a freed x's address could otherwise be reused by the next input of the same
        # shape within the batch (attention's input → the MLP's), which would then hit a stale entry.
        key = (x.data_ptr(), tuple(x.shape), what)
        hit = self._memo.get(key)
        if hit is None or hit[0] is not x:
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            if what == "gram":
                v = (xf.t() @ xf).double()
            elif what == "sq":
                v = xf.pow(2).sum(0).double()
            elif what == "abs":
                v = xf.abs().sum(0).double()
            elif what == "keys":
                v = torch.rand(xf.shape[0], generator=self._batch_generator(), dtype=torch.float64)
            else:
                v = xf.abs().amax(0)
            self._memo[key] = (x, v)
        return self._memo[key][1]

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        s, needs = self.stats[name], self.needs[name]
        n = x.numel() // x.shape[-1]
        if "gram" in needs:
            g = self._compute(x, "gram")
            _check_finite(g, self.prefix + name)
            if s.gram_sum is None:
                s.gram_sum = g.clone()      # g may be shared by linears reading the same input
            else:
                s.gram_sum.add_(g)          # in place: no second n×n buffer per batch
        if "input_norm" in needs and "gram" not in needs:
            v = self._compute(x, "sq")
            _check_finite(v, self.prefix + name)
            s.sq_sum = v.clone() if s.sq_sum is None else s.sq_sum + v
        if "abs_mean" in needs:
            v = self._compute(x, "abs")
            _check_finite(v, self.prefix + name)
            s.abs_sum = v.clone() if s.abs_sum is None else s.abs_sum + v
        if "abs_max" in needs:
            v = self._compute(x, "max")
            _check_finite(v, self.prefix + name)
            s.abs_max = v.clone() if s.abs_max is None else torch.maximum(s.abs_max, v)
        if "input_sample" in needs:
            keys = self._compute(x, "keys")
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            if s.sample is not None:
                keys, rows = torch.cat([s.sample_keys, keys]), torch.cat([s.sample, rows])
            if keys.numel() > self.sample_rows:
                idx = torch.topk(keys, self.sample_rows, largest=False).indices.sort().values
                keys, rows = keys[idx], rows[idx]
            _check_finite(rows, self.prefix + name)
            s.sample_keys, s.sample = keys.clone(), rows.clone()
        if self._batch == 0 and "input_sample" in needs and "input_group" not in s.extra:
            # x is alive in the memo (its keys) until next_batch(): no other tensor can share its address
            s.extra["input_group"] = self._groups.setdefault((x.data_ptr(), tuple(x.shape)), len(self._groups))
        s.n_tokens += n

    def _batch_generator(self) -> torch.Generator:
        # One generator per global batch: distinct tensors of a batch draw from it in hook order, which
        # is the same in every process. fp64 keys: ties (which would make the kept set depend on the
        # merge order) are practically impossible, unlike with 24-bit fp32 keys.
        if self._gen is None:
            k = self.batch_offset + self._batch
            self._gen = torch.Generator().manual_seed((self.seed * 1_000_003 + k) & 0x7FFF_FFFF_FFFF_FFFF)
        return self._gen

    def next_batch(self) -> None:
        """Forget per-batch shared results (call after each forward)."""
        self._memo.clear()
        self._gen = None
        self._batch += 1


def collect_fisher(model: nn.Module, samples: torch.Tensor, modules: dict[str, nn.Module],
                   batch_size: int = 1, progress: bool = True) -> dict[str, LinearStats]:
    """Empirical Fisher of the weights of ``modules`` from per-sequence LM-loss gradients.

    The loss of each sequence is its token-mean next-token cross-entropy (FWSVD's "one gradient per
    sample"); a batch's loss is the *sum* of its sequences' losses, so, as sequences do not interact
    in a causal LM, sequence ``b``'s gradient is ``G_b = g_bᵀ x_b`` from the linear's output gradient
    and input of that sequence alone. ``Σ_b G_b²`` is accumulated (fp64) reduced to one value per
    input column (``fisher_in``) and per output row (``fisher_out``): memory stays
    O(batch·out·in) for the one linear being processed, whatever the number of samples.
    ``n_tokens`` counts the sequences. The backward pass keeps every block's activations and the
    full-vocabulary logits of the whole batch, so memory grows with the batch (SmolLM2-135M, 512
    tokens: peak RSS 2.3 GB at one sequence per batch, 6.3 GB at four): the default is one sequence
    per batch; the result does not depend on the batch size.
    """
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    stats = {n: LinearStats(m.in_features) for n, m in modules.items()}

    def on_forward(name):
        def hook(mod, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_grad(g, x=x):
                G = torch.einsum("bto,bti->boi", g.float(), x.float())        # per-sequence gradients
                G2 = G * G
                _check_finite(G2, name)
                st = stats[name]
                fin, fout = G2.sum((0, 1)).double(), G2.sum((0, 2)).double()
                st.fisher_in = fin if st.fisher_in is None else st.fisher_in + fin
                st.fisher_out = fout if st.fisher_out is None else st.fisher_out + fout
            output.register_hook(on_grad)
        return hook

    handles = [m.register_forward_hook(on_forward(n)) for n, m in modules.items()]
    was_training = model.training
    req = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        starts = range(0, len(samples), batch_size)
        for s in tqdm(starts, desc="fisher", unit="batch", disable=not progress, leave=False):
            ids = samples[s:s + batch_size]
            with torch.enable_grad():
                # Gradients must reach every hooked linear: make the embedding output a leaf that needs grad.
                h = emb(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=h, use_cache=False).logits
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
                ce.view(len(ids), -1).mean(1).sum().backward()
            del logits, ce, h
            for st in stats.values():
                st.n_tokens += len(ids)
    finally:
        for hd in handles:
            hd.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    return stats
