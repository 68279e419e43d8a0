"""The native checkpoint format. Light on purpose: it imports the compressed modules and kernels
but no compressor or calibration code, so serving code can depend on it alone.

Layout of a checkpoint directory::

    config.json            the model config + quantization_config (quant_method "tensorpress"):
                           format version, the format of every compressed module, shard checksums
    model*.safetensors     the tensors (sharded above 2 GB, with model.safetensors.index.json)
    tensorpress-recipe.yaml  the recipe that produced it (provenance)
    tokenizer files, generation_config.json, report.json, layers.jsonl (when written by the CLI)
"""
from .io import load, save, read_quantization_config
from .format import QUANT_METHOD, FORMAT_VERSION, replace_modules

__all__ = ["load", "save", "read_quantization_config", "QUANT_METHOD", "FORMAT_VERSION", "replace_modules"]
