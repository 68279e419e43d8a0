"""Compressed linear modules: the in-memory form of every compressed format.

One class per storage format; all share :class:`CompressedLinear` (bias, optional low-rank
correction, config round trip). ``FORMATS`` maps the format name written in checkpoints to the class.
"""
from .modules import CompressedLinear, DenseLinear, LowRankLinear, QuantLinear, FORMATS, module_from_config

__all__ = ["CompressedLinear", "DenseLinear", "LowRankLinear", "QuantLinear", "FORMATS", "module_from_config"]
