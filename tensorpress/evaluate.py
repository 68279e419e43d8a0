"""Evaluation per docs/protocol.md: perplexity, size and bits-per-weight accounting."""
from __future__ import annotations

import math
import resource
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .modeling import decoder_layers, target_linears


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over the windows, each scored on its own (``L-1`` tokens each).

    The NLL is summed in fp64 over every scored token, so the result is the token-weighted mean
    of the protocol, identical to ``labels=input_ids`` on each window.
    """
    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch",
                  disable=not progress, leave=False):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum")
        nll += float(loss.double())
        count += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "scored_tokens": count}


def model_bytes(model) -> int:
    """Bytes of every tensor the model stores (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def bits_per_weight(model) -> dict:
    """Stored bits per original weight over the decoder linears (scales, zeros, factors, masks and
    index metadata included; biases excluded, as for the dense 32 bits/weight baseline)."""
    from .nn import CompressedLinear
    bits = weights = 0
    n_compressed = 0
    for layer in decoder_layers(model):
        for m in target_linears(layer).values():
            weights += m.in_features * m.out_features
            if isinstance(m, CompressedLinear):
                bits += m.storage_bits()
                n_compressed += 1
            else:
                bits += m.weight.numel() * m.weight.element_size() * 8
    return {"bits_per_weight": bits / max(weights, 1), "linear_weights": weights,
            "compressed_linears": n_compressed}


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
