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
