"""tensorpress: post-training compression of LLMs (low-rank, 4-bit quantisation, pruning) with
checkpoints other engines load and kernels that run them.

Python API (each a documented call)::

    import tensorpress as tp
    model, tok = tp.load_model("default")                  # HF dir, .gguf file or "default"
    recipe = tp.Recipe.load("gptq-w4g64")                  # shipped name, YAML path or dict
    samples = tp.calibration_samples(tok)                  # or tp.load_calibration(data, tok)
    records = tp.compress(model, recipe, samples)          # in place, block by block
    tp.evaluate(model, tok)                                # protocol perplexity + sizes
    tp.save(model, "out", tokenizer=tok, recipe=recipe)    # atomic native checkpoint
    model = tp.load("out")                                 # compressed modules rebuilt
    tp.export("out", "out-gptq", "gptq")                   # or "compressed-tensors"

After ``import tensorpress``, ``transformers.AutoModelForCausalLM.from_pretrained("out")`` also
loads native checkpoints.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, TensorpressError

_LAZY = {
    "Recipe": ("recipe", "Recipe"),
    "load_model": ("modeling", "load_model"),
    "calibration_samples": ("calib.data", "calibration_samples"),
    "eval_windows": ("calib.data", "eval_windows"),
    "load_calibration": ("calib.data", "load_calibration"),
    "compress": ("compress.apply", "compress_model"),
    "evaluate": ("api", "evaluate"),
    "save": ("checkpoint", "save"),
    "load": ("elastic", "load"),                 # checkpoint.load (+ prune_rate for UniQL checkpoints)
    "export": ("export", "export"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(name)


def _register_transformers() -> None:
    try:
        from .checkpoint.hf import register
    except ImportError:   # transformers absent: native loading still works
        return
    register()


_register_transformers()

__all__ = ["CheckpointError", "TensorpressError", "__version__", *_LAZY]
