"""Layer-sequential calibration: one decoder block at a time.

1. ``capture`` runs the model once per calibration batch with every decoder block swapped for a
   recorder: it keeps the inputs of block 0 and the keyword arguments each block receives
   (attention masks, rotary embeddings — they differ per block type on e.g. Gemma), at the cost of
   the embeddings only.
2. For each block, ``BlockRunner.run`` feeds the current inputs through the block; the caller hooks
   the block's linears to collect statistics, compresses them, and runs the block again to produce
   the next block's inputs. Only one block's inputs (and outputs) are alive at any time, so memory
   does not grow with depth.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..modeling import decoder_layers


class _Stop(Exception):
    pass


class Captured:
    """Inputs of block 0 per batch, and the (args, kwargs) every block receives per batch."""

    def __init__(self):
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[tuple[tuple, dict]]] = []   # [batch][layer] -> (args, kwargs)


class ActivationStore:
    """The per-batch activations of the current block, in memory or, once they pass ``budget_bytes``,
    spilled to one file per batch in ``directory`` (read back one batch at a time).

    A drop-in for the list ``capture``/``run_block`` use: ``append``, ``len``, iteration, ``[k]`` and
    ``[k] = t``. ``budget_bytes=None`` keeps everything in memory (a plain list's behaviour). Files
    are read with ``read()`` into private memory, so a batch costs memory only while it is used.
    """

    def __init__(self, directory, budget_bytes: int | None = None):
        from pathlib import Path
        self.directory, self.budget = Path(directory), budget_bytes
        self._mem: list = []             # tensors, or (shape, dtype) of a spilled batch
        self._bytes = 0

    def _path(self, k: int):
        return self.directory / f"batch-{k:06d}.bin"

    def _spill(self, k: int, t: torch.Tensor):
        import numpy as np
        self.directory.mkdir(parents=True, exist_ok=True)
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.bfloat16:    # numpy has no bfloat16: store its bits
            t.view(torch.int16).numpy().tofile(self._path(k))
        else:
            t.numpy().tofile(self._path(k))
        return (tuple(t.shape), t.dtype)

    def _fits(self, t: torch.Tensor) -> bool:
        return self.budget is None or self._bytes + t.numel() * t.element_size() <= self.budget

    def append(self, t: torch.Tensor) -> None:
        k = len(self._mem)
        if self._fits(t):
            self._mem.append(t)
            self._bytes += t.numel() * t.element_size()
        else:
            self._mem.append(self._spill(k, t))

    def __len__(self) -> int:
        return len(self._mem)

    def __getitem__(self, k: int) -> torch.Tensor:
        import numpy as np
        v = self._mem[k]
        if isinstance(v, torch.Tensor):
            return v
        shape, dtype = v
        raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
        a = np.fromfile(self._path(k), dtype=torch.empty(0, dtype=raw_dtype).numpy().dtype)
        t = torch.from_numpy(a).view(shape)
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t

    def __setitem__(self, k: int, t: torch.Tensor) -> None:
        v = self._mem[k]
        if isinstance(v, torch.Tensor):
            self._mem[k] = t
        else:
            self._mem[k] = self._spill(k, t)

    def __iter__(self):
        for k in range(len(self._mem)):
            yield self[k]

    @property
    def spilled(self) -> int:
        """Number of batches on disk."""
        return sum(not isinstance(v, torch.Tensor) for v in self._mem)

    def clear(self) -> None:
        import shutil
        self._mem.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


@torch.no_grad()
def capture(model: nn.Module, samples: torch.Tensor, batch_size: int, hidden=None) -> Captured:
    """Record block 0's inputs (into ``hidden``: a list by default, or an :class:`ActivationStore`)
    and every block's call arguments, per calibration batch."""
    layers = decoder_layers(model)
    cap = Captured()
    if hidden is not None:
        cap.hidden = hidden
    device = next(model.parameters()).device
    current: list = []

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                cap.hidden.append(hidden_states.detach())
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            current.append((args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)          # instance attribute shadows the class forward
    try:
        for start in range(0, len(samples), batch_size):
            current = []
            try:
                model(input_ids=samples[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            cap.calls.append(current)
    finally:
        for layer in layers:
            del layer.forward
    return cap


def run_block(layer: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]],
              after_batch=None, keep: bool = True, inplace: bool = False) -> list[torch.Tensor] | None:
    """Outputs of ``layer`` for every batch of ``hidden`` (block's own args/kwargs per batch).

    ``keep=False`` runs the block for its side effects only (statistics hooks) and drops each
    batch's output at once, so a statistics pass never holds a second copy of the stream.
    ``inplace=True`` writes each batch's output over its input in ``hidden`` (and returns it): one
    stream plus one batch alive instead of two streams.
    """
    outs = (hidden if inplace else []) if keep else None
    with torch.no_grad():
        for k, (h, (args, kwargs)) in enumerate(zip(hidden, calls)):
            o = layer(h, *args, **kwargs)
            if keep:
                o = (o[0] if isinstance(o, tuple) else o).detach()
                if inplace:
                    outs[k] = o
                else:
                    outs.append(o)
            del o, h
            if after_batch is not None:
                after_batch()
    return outs


def release_memory() -> None:
    """Hand freed heap pages back to the OS between blocks (glibc keeps them otherwise, and the
    resident size of a long layer-sequential run creeps up with fragmentation)."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to do
        pass


_MADV_PAGEOUT = 21          # Linux >= 5.4: reclaim the pages, contents preserved (unlike MADV_DONTNEED)


def release_pages(tensors) -> int:
    """Ask the kernel to reclaim the pages of tensors that are no longer needed; returns bytes advised.

    Weights loaded from safetensors are memory-mapped: every page a block's compression read stays
    resident (and counted in RSS) after the dense linear was replaced, although nothing reads it again.
    ``MADV_PAGEOUT`` drops such clean file-backed pages (they would be re-read from the file if
    anything touched them), so resident memory follows the compressed model instead of growing to the
    whole dense file. It never changes contents, so a tensor someone else still holds stays valid.
    Only whole pages inside each tensor are advised; a no-op off Linux.
    """
    import ctypes
    import mmap
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    page = mmap.PAGESIZE
    done = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.numel():
            continue
        lo = -(-t.data_ptr() // page) * page
        hi = (t.data_ptr() + t.numel() * t.element_size()) // page * page
        if hi > lo and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT) == 0:
            done += hi - lo
    return done
