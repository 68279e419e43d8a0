"""Execution of compressed linears. Knows tensors, not compression methods.

``reference`` holds the pure-PyTorch definition of every op (the test oracle, and the CPU path);
``ops`` is the public entry point that dispatches to a backend (``TENSORPRESS_BACKEND``, see
``_env``). Triton is optional: importing this package never imports it.
"""
from .ops import dequantize_weight, lowrank_linear, quant_linear, sparse24_linear, to_semi_structured, w4a8_linear

__all__ = ["dequantize_weight", "lowrank_linear", "quant_linear", "sparse24_linear", "to_semi_structured",
           "w4a8_linear"]
