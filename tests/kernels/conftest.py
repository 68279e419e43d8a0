"""Kernel-test setup.

``@triton.jit`` decides interpreted vs compiled when a kernel module is *imported*, so the switch is
set here, before any test imports one. On a machine with a GPU it is left unset: the ``gpu`` tier
then runs compiled kernels and the interpreter tier skips (run it with ``TRITON_INTERPRET=1``).
The interpreter backend (``TENSORPRESS_BACKEND=interpret``) is enabled per test by the
``interpret`` fixture only, so the rest of the suite keeps the fast reference path.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and compiled Triton kernels (skipped otherwise)")


@pytest.fixture
def interpret(monkeypatch):
    """Route the public ops through the Triton kernels on CPU (interpreter) for this test."""
    pytest.importorskip("triton")
    from tensorpress.kernels import _env

    if not _env.interpreting():
        pytest.skip("TRITON_INTERPRET is not set (GPU machine): interpreter tier skipped")
    monkeypatch.setenv("TENSORPRESS_BACKEND", "interpret")
    monkeypatch.delenv("TENSORPRESS_KERNEL_CONFIGS", raising=False)


@pytest.fixture
def cuda(monkeypatch):
    """Compiled Triton kernels on the GPU (``auto`` dispatch)."""
    import torch

    pytest.importorskip("triton")
    from tensorpress.kernels import _env

    if not torch.cuda.is_available() or _env.interpreting():
        pytest.skip("needs a CUDA GPU with TRITON_INTERPRET unset")
    monkeypatch.setenv("TENSORPRESS_BACKEND", "auto")
    return torch.device("cuda")


@pytest.fixture
def count_loads(monkeypatch):
    """``count_loads(t)`` → an int64 tensor shaped like ``t`` that counts, per element, how many
    times the interpreted kernels run afterwards load it (masked-off lanes not counted). Hooks the
    interpreter's masked load, whose first two arguments (pointers, mask) are the same on Triton
    3.6–3.9; ``tl.load`` without a mask goes through it too."""
    import numpy as np
    import torch
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    watched = []
    orig = interpreter.InterpreterBuilder.create_masked_load

    def load(self, ptrs, mask, *rest):
        addrs = np.asarray(ptrs.data).astype(np.uint64).ravel()
        on = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape).ravel().astype(bool)
        addrs = addrs[on]
        for base, size, item, counts in watched:
            hit = addrs[(addrs >= base) & (addrs < base + size * item)]
            np.add.at(counts, ((hit - base) // item).astype(np.int64), 1)
        return orig(self, ptrs, mask, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)

    def watch(t):
        assert t.is_contiguous()
        counts = np.zeros(t.numel(), dtype=np.int64)
        watched.append((t.data_ptr(), t.numel(), t.element_size(), counts))
        return torch.from_numpy(counts).view(t.shape)       # shares memory: live counts
    return watch


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch (Launch.__call__) and every lowrank.down call, in order."""
    from tensorpress.kernels import _env, _tl
    seen = []
    call = _tl.Launch.__call__
    monkeypatch.setattr(_tl.Launch, "__call__", lambda self: seen.append(self.kernel.__name__) or call(self))
    lr = _env.kernel_module("lowrank")
    down = lr.down
    monkeypatch.setattr(lr, "down", lambda *a, **k: seen.append("lowrank.down") or down(*a, **k))
    return seen
