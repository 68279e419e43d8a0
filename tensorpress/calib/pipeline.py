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


@torch.no_grad()
def capture(model: nn.Module, samples: torch.Tensor, batch_size: int) -> Captured:
    layers = decoder_layers(model)
    cap = Captured()
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
