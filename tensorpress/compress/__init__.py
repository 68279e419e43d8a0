"""Compressors (one stage each) and their registry. Importing this package registers them all."""
from .base import REGISTRY, Compressor, LinearContext, get_compressor, register
from . import rtn, gptq, svd, eora, wanda, sparsegpt, armor, lost, svdquant  # noqa: F401  (registration)
from . import uniql  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Compressor", "LinearContext", "get_compressor", "register"]
