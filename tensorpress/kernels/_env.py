"""Backend selection: which implementation an op runs, decided per call from the environment.

``TENSORPRESS_BACKEND``:

* ``auto`` (default): CUDA tensors on sm_80+ with Triton importable use the Triton/cuBLAS dispatch
  of :mod:`.configs`; everything else runs the pure-PyTorch reference.
* ``reference``: the reference everywhere (the spec; slow on GPU).
* ``triton``: Triton kernels for every CUDA shape (no cuBLAS / cuSPARSELt shortcuts at large M), the
  reference for CPU tensors. Raises if Triton is missing.
* ``interpret``: Triton kernels on CPU tensors through the Triton interpreter. Tests only; needs
  ``TRITON_INTERPRET=1`` in the environment *before* the kernel modules are imported, because
  ``@triton.jit`` decides compiled vs interpreted when the decorator runs.

Triton is imported lazily (only when a Triton path is taken), so the package works without it.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from ..errors import TensorpressError

BACKENDS = ("auto", "reference", "triton", "interpret")


def backend() -> str:
    b = os.environ.get("TENSORPRESS_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise TensorpressError(f"TENSORPRESS_BACKEND={b!r}; expected one of {', '.join(BACKENDS)}")
    return b


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# Set by ``aot.py`` while it builds launches for a GPU it does not have (CPU-only compile checks).
aot_target: tuple[int, int] | None = None


def capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability the kernels are built for; None for CPU tensors (interpreter)."""
    if aot_target is not None:
        return aot_target
    return _capability(device.index or 0) if device.type == "cuda" else None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton family of paths handles an op whose activations are ``x``."""
    b = backend()
    if b == "reference":
        return False
    if b == "interpret":
        if not interpreting():
            raise TensorpressError("TENSORPRESS_BACKEND=interpret needs TRITON_INTERPRET=1 set before "
                                   "tensorpress' kernel modules are imported")
        return _require_triton(b)
    if x.device.type != "cuda":
        return False
    if b == "triton":
        return _require_triton(b)
    return triton_available() and capability(x.device) >= (8, 0)


def fast_paths_allowed() -> bool:
    """cuBLAS / cuSPARSELt shortcuts (large M) are allowed only under ``auto``."""
    return backend() == "auto"


def _require_triton(b: str) -> bool:
    if not triton_available():
        raise TensorpressError(f"TENSORPRESS_BACKEND={b} but triton is not importable")
    return True


def kernel_module(name: str):
    """Import a Triton kernel module (``w4a16``, ``lowrank``, ...) and check it was built in the mode
    the environment asks for: a module imported before ``TRITON_INTERPRET=1`` holds compiled-mode
    kernels that cannot run on CPU tensors (and vice versa)."""
    mod = importlib.import_module(f"{__package__}.{name}")
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(mod.KERNELS[0], InterpretedFunction) != interpreting():
        raise TensorpressError(f"tensorpress.kernels.{name} was imported with TRITON_INTERPRET="
                               f"{'1' if not interpreting() else 'unset'}; set it before the first import")
    return mod


def num_sms(device: torch.device) -> int:
    if device.type == "cuda" and aot_target is None:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter / AOT: an H100, so CPU tests exercise the GPU split-K arithmetic


def device_key(device: torch.device) -> str:
    """Key of the config table: ``sm90``, ``sm80``, ... (``interpret`` for the CPU interpreter)."""
    cap = capability(device)
    return "interpret" if cap is None else f"sm{cap[0]}{cap[1]}"
