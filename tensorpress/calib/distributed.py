"""Distributed calibration: ranks share the calibration batches and sum their statistics.

Launched by ``torchrun --nproc-per-node N`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` in the environment), :func:`init` joins one process group (gloo on CPU, NCCL when the
model runs on CUDA). Then:

* :func:`shard_samples` gives each rank a contiguous run of WHOLE calibration batches (the batches of a
  single-process run, split in order), so every batch is computed exactly as a single process would;
* after a block's statistics pass, :func:`all_reduce_stats` sums the Gram / squared / absolute sums,
  the Fisher and the token counts, takes the max of ``abs_max`` and merges the ``input_sample``
  reservoirs by smallest key (a token's key depends on its global batch index, not on the rank: see
  :class:`~tensorpress.calib.collectors.InputCollector`): every rank then holds the statistics of all
  the calibration tokens, equal to a single process's up to floating-point summation order;
* every rank compresses (compressors are deterministic), then :func:`broadcast_module` copies rank 0's
  compressed module to the others, so all ranks run bit-identical blocks forward; rank 0 alone writes.

Without a process group (or with one rank) every helper returns at once and changes nothing.
"""
from __future__ import annotations

import datetime
import json
import os

import torch
import torch.nn as nn

from ..errors import TensorpressError
from .collectors import SAMPLE_ROWS, LinearStats

# Ranks wait for rank 0's dense and compressed evaluations (minutes to hours on CPU); a crashed rank
# still ends the job at once (torchrun stops the others), so a long timeout costs nothing then.
TIMEOUT = datetime.timedelta(hours=12)

_state = {"created": False, "batch_offset": 0}


# --- process group -----------------------------------------------------------------------------------

def launched() -> bool:
    """True when the environment says this process is one of several (torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def active() -> bool:
    """True inside a process group of more than one rank."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str | torch.device | None = None) -> int:
    """Join the process group torchrun described (gloo; NCCL for a CUDA ``device``); returns the world
    size. A no-op returning 1 when not launched distributed; an existing group is used as it is."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_world_size()
    if not launched():
        return 1
    if not d.is_available():
        raise TensorpressError("launched with WORLD_SIZE > 1 but this torch has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TensorpressError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun")
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    d.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _state["created"] = True
    return d.get_world_size()


def close() -> None:
    """Leave the process group if :func:`init` created it."""
    if _state["created"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _state["created"] = False
    _state["batch_offset"] = 0


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def finish() -> None:
    """The last synchronisation of a run: every rank waits until rank 0 has written, then leaves.
    Gloo can raise on a rank whose peer already exited after completing the final barrier (a
    shutdown race, "connection closed by peer"); that is no failure of the run — rank 0's exit code
    is the run's result — so only rank 0 reports errors here."""
    try:
        barrier()
    except Exception:
        if is_main():
            raise
    try:
        close()
    except Exception:
        if is_main():
            raise


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- samples -----------------------------------------------------------------------------------------

def shard_samples(samples: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's calibration samples: a contiguous run of whole batches of ``batch_size`` (ranks in
    order, batch counts differing by at most one; only the last rank may end with the short last batch).
    Remembers the global index of the rank's first batch (:func:`batch_offset`) for the collectors."""
    if not active():
        _state["batch_offset"] = 0
        return samples
    n_batches = -(-len(samples) // batch_size)
    w, r = world_size(), rank()
    if n_batches < w:
        raise TensorpressError(f"{w} ranks but only {n_batches} calibration batch(es) of {batch_size}: "
                               f"use at most {n_batches} process{'es' if n_batches > 1 else ''}, more samples or a "
                               f"smaller batch size")
    lo, hi = r * n_batches // w, (r + 1) * n_batches // w
    _state["batch_offset"] = lo
    return samples[lo * batch_size:hi * batch_size]


def batch_offset() -> int:
    """Global index of this rank's first calibration batch (0 in a single process)."""
    return _state["batch_offset"] if active() else 0


# --- statistics ----------------------------------------------------------------------------------------

_SUMS = ("gram_sum", "sq_sum", "abs_sum", "fisher_in", "fisher_out")
_FIELDS = _SUMS + ("abs_max", "sample")


def all_reduce_stats(stats: dict[str, LinearStats], sample_rows: int = SAMPLE_ROWS) -> dict[str, LinearStats]:
    """Statistics of all ranks' tokens, in place on every rank (and returned): SUM of the sums and
    ``n_tokens``, MAX of ``abs_max``, and the ``sample_rows`` smallest-key rows of the union of the
    ``input_sample`` reservoirs (in rank order, i.e. calibration order, as one process keeps them).
    Every rank must pass the same linears in the same order (they run the same code)."""
    if not active() or not stats:
        return stats
    dist = torch.distributed
    dev, names = _comm_device(), list(stats)
    # The token counts and which statistics exist, for all linears: one collective.
    counts = torch.tensor([[stats[n].n_tokens] + [int(getattr(stats[n], f) is not None) for f in _FIELDS]
                           for n in names], dtype=torch.int64, device=dev)
    dist.all_reduce(counts)
    present = counts[:, 1:]
    if bool(((present != 0) & (present != world_size())).any()):
        raise TensorpressError("calibration statistics are missing on some ranks (a rank saw no batch?)")
    for k, n in enumerate(names):
        st = stats[n]
        st.n_tokens = int(counts[k, 0])
        for f in _SUMS:
            t = getattr(st, f)
            if t is not None:
                setattr(st, f, _all_reduce(t, dist.ReduceOp.SUM, dev))
        if st.abs_max is not None:
            st.abs_max = _all_reduce(st.abs_max, dist.ReduceOp.MAX, dev)
        if st.sample is not None:
            st.sample_keys, st.sample = _merge_samples(st.sample_keys, st.sample, sample_rows, dev)
    return stats


def _all_reduce(t: torch.Tensor, op, dev) -> torch.Tensor:
    x = t.to(dev).contiguous()
    torch.distributed.all_reduce(x, op=op)
    return x.to(t.device)


def _merge_samples(keys: torch.Tensor, rows: torch.Tensor, sample_rows: int, dev):
    """Gather every rank's (keys, rows), keep the ``sample_rows`` smallest keys in gathered order."""
    dist, w = torch.distributed, world_size()
    n = torch.tensor([keys.numel()], dtype=torch.int64, device=dev)
    ns = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(ns, n)
    ns = [int(x) for x in ns]
    m = max(ns)                                   # all_gather needs equal sizes: pad to the largest
    home_k, home_x = keys.device, rows.device
    k = torch.full((m,), float("inf"), dtype=keys.dtype, device=dev)
    k[:keys.numel()] = keys.to(dev)
    x = torch.zeros(m, rows.shape[1], dtype=rows.dtype, device=dev)
    x[:rows.shape[0]] = rows.to(dev)
    ks, xs = [torch.empty_like(k) for _ in range(w)], [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(ks, k)
    dist.all_gather(xs, x)
    keys = torch.cat([kk[:c] for kk, c in zip(ks, ns)])
    rows = torch.cat([xx[:c] for xx, c in zip(xs, ns)])
    if keys.numel() > sample_rows:
        idx = torch.topk(keys, sample_rows, largest=False).indices.sort().values
        keys, rows = keys[idx], rows[idx]
    return keys.to(home_k), rows.to(home_x)


# --- compressed modules ----------------------------------------------------------------------------------

def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of ``t`` (same shape and dtype on every rank), in place; returns ``t``."""
    if active():
        x = t.to(_comm_device()).contiguous()
        torch.distributed.broadcast(x, src=0)
        if x is not t:
            t.copy_(x)
    return t


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _describe(module: nn.Module) -> dict:
    cfg = module.config() if hasattr(module, "config") else None
    dtype = getattr(module, "dtype_", None)
    return {"config": cfg, "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "tensors": [[n, list(t.shape), str(t.dtype)] for n, t in _tensors(module).items()]}


def _layout(desc: dict) -> list:
    return sorted((n, tuple(shape), dt) for n, shape, dt in desc["tensors"])


def _broadcast_bytes(data: bytes | None, dev) -> bytes:
    n = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(n, src=0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data is not None
           else torch.empty(int(n), dtype=torch.uint8, device=dev))
    torch.distributed.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy())


def broadcast_module(module: nn.Module) -> nn.Module:
    """Rank 0's compressed module on every rank: its description (format config, tensor names, shapes,
    dtypes) and then all its tensors, bit for bit. A rank whose own module differs in structure (a
    data-dependent shape) rebuilds it from rank 0's config first. Returns the module to use."""
    if not active():
        return module
    dist, dev = torch.distributed, _comm_device()
    desc = json.loads(json.dumps(_describe(module)))          # as rank 0's arrives: JSON types
    ref = json.loads(_broadcast_bytes(json.dumps(desc).encode() if is_main() else None, dev))
    if (desc["config"] != ref["config"] or _layout(desc) != _layout(ref)) and ref["config"] is not None:
        from ..nn import module_from_config
        device = next(iter(_tensors(module).values())).device
        module = module_from_config(ref["config"], getattr(torch, ref["dtype"] or "float32")).to(device)
        desc = json.loads(json.dumps(_describe(module)))
    ok = torch.tensor([int(_layout(desc) == _layout(ref))], dtype=torch.int64, device=dev)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)                  # every rank fails together, none hangs
    if not int(ok):
        raise TensorpressError("compressed modules differ in structure between ranks and cannot be synchronised")
    own = _tensors(module)
    # One flat byte buffer for all tensors, in rank 0's order: one collective per module.
    order = [own[name] for name, _, _ in ref["tensors"]]
    sizes = [t.numel() * t.element_size() for t in order]
    if is_main():
        buf = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(dev) for t in order]) \
            if order else torch.empty(0, dtype=torch.uint8, device=dev)
    else:
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    if not is_main():
        o = 0
        for t, s in zip(order, sizes):
            t.data.copy_(buf[o:o + s].clone().view(t.dtype).view(t.shape))
            o += s
    return module
