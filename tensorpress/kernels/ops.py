"""Public kernel entry points. Each op picks a backend by device, shape and batch size.

``TENSORPRESS_BACKEND=reference`` forces the pure-PyTorch path everywhere.
"""
from __future__ import annotations

import torch

from . import reference


def dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype=torch.float32):
    return reference.dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features, dtype)


def quant_linear(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features,
                 bias=None, lr_down=None, lr_up=None):
    return reference.quant_linear(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features,
                                  bias, lr_down, lr_up)


def lowrank_linear(x, down, up, bias=None):
    return reference.lowrank_linear(x, down, up, bias)
