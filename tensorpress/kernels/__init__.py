"""Execution of compressed linears. Knows tensors, not compression methods.

``reference`` holds the pure-PyTorch definition of every op (the test oracle, and the CPU path);
``ops`` is the public entry point that dispatches to a backend (``TENSORPRESS_BACKEND``, see
``_env``). Triton is optional: importing this package never imports it.

Triton versions checked (2026-12-01, torch 2.13.0+cpu, no GPU): 3.6.0 (with numpy<2.4), 3.7.1, 3.8.0
and 3.9.0 each pass the interpreter tier of ``tests/kernels`` and the sm_90/sm_80 ahead-of-time
compile of every config row (``tests/kernels/test_aot.py``); details and commands in
``benchmarks/results/kernels-compat.md``. GPU tier and benchmark: not yet run.
"""
from .ops import dequantize_weight, lowrank_linear, quant_linear, sparse24_linear, to_semi_structured, w4a8_linear

__all__ = ["dequantize_weight", "lowrank_linear", "quant_linear", "sparse24_linear", "to_semi_structured",
           "w4a8_linear"]
