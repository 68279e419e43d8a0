"""Backend selection, config table, custom-op registration and the per-batch dispatch branches."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tensorpress.errors import TensorpressError
from tensorpress.kernels import _env, configs, ops, reference
from tensorpress.kernels.testing import random_24, random_w4, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_backend_env(monkeypatch):
    monkeypatch.delenv("TENSORPRESS_BACKEND", raising=False)
    assert _env.backend() == "auto"
    x = torch.zeros(1, 4)
    assert not _env.use_triton(x)                       # CPU tensors: reference under auto
    monkeypatch.setenv("TENSORPRESS_BACKEND", "triton")
    assert not _env.use_triton(x)                       # ... and under triton (no CPU Triton)
    monkeypatch.setenv("TENSORPRESS_BACKEND", "bogus")
    with pytest.raises(TensorpressError, match="TENSORPRESS_BACKEND='bogus'"):
        _env.backend()
    monkeypatch.setenv("TENSORPRESS_BACKEND", "interpret")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TensorpressError, match="TRITON_INTERPRET=1"):
        _env.use_triton(x)


def test_import_and_cpu_ops_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, tensorpress, tensorpress.kernels as k\n"
            "from tensorpress.kernels import testing, reference\n"
            "L = testing.random_w4(16, 32, 16, rank=8)\n"
            "x = torch.randn(2, 32).half()\n"
            "assert torch.equal(k.quant_linear(x, **L), reference.quant_linear(x, **L))\n"
            "assert 'triton' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORPRESS_BACKEND", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_config_table_and_overrides(monkeypatch, tmp_path):
    assert configs.select("w4a16_gemm", "sm90", 1)["BLOCK_M"] == 16
    assert configs.select("w4a16_gemm", "sm90", 64)["BLOCK_M"] == 64
    assert configs.select("w4a16_gemm", "sm90", 4096)["SPLIT_K"] == 1
    assert configs.select("w4a16_gemv", "sm_unknown", 1) == configs.select("w4a16_gemv", "sm90", 1)
    assert configs.split_k(tiles=32, k_blocks=32, sms=132) == 16     # capped: ≥ 2 K-blocks per split
    assert configs.split_k(tiles=112, k_blocks=32, sms=132) == 5
    assert configs.split_k(tiles=1000, k_blocks=32, sms=132) == 1
    assert configs.pow2_block_k(128, 64, 16) == 64 and configs.pow2_block_k(128, 40, 16) == 128
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"sm90": {"w4a16_gemv": [[1, {"BLOCK_N": 256, "BLOCK_K": 64}]],
                                         "thresholds": {"gemv_max_m": 4}}}))
    monkeypatch.setenv("TENSORPRESS_KERNEL_CONFIGS", str(path))
    assert configs.select("w4a16_gemv", "sm90", 1) == {"BLOCK_N": 256, "BLOCK_K": 64}
    assert configs.thresholds("sm90")["gemv_max_m"] == 4 and configs.thresholds("sm80")["gemv_max_m"] == 1
    with pytest.raises(LookupError):
        configs.select("w4a16_gemv", "sm90", 2)


def _op_cases():
    L = random_w4(24, 64, 32, rank=8, bias=True, dtype=torch.float32)
    x = torch.randn(3, 64)
    w4 = [L[k] for k in ("qweight", "scales", "qzeros", "g_idx", "bits", "group_size", "in_features", "bias",
                         "lr_down", "lr_up")]
    S = random_24(32, 64, armor=16, bias=True, dtype=torch.float32)
    return [
        (ops._quant_linear, (x, *w4)),
        (ops._dequantize_weight, (*w4[:7], torch.float16)),
        (ops._w4a8_linear, (x, *w4[:4], *w4[5:], torch.rand(64) + 0.5, 32)),
        (ops._lowrank_linear, (x, L["lr_down"], L["lr_up"], L["bias"])),
        (ops._sparse24_linear, (x, S["values"], S["meta"], 64, S["bias"], S["armor_a"], S["armor_b"])),
    ]


@pytest.mark.parametrize("case", range(5))
def test_custom_ops_opcheck(monkeypatch, case):
    monkeypatch.setenv("TENSORPRESS_BACKEND", "reference")
    op, args = _op_cases()[case]
    assert op._qualname.startswith("tensorpress::")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_grad_inputs_take_the_differentiable_reference(interpret):
    down = torch.randn(8, 32, requires_grad=True)
    up = torch.randn(16, 8)
    x = torch.randn(2, 32)
    y = ops.lowrank_linear(x, down, up)
    y.sum().backward()
    assert down.grad is not None and down.grad.abs().sum() > 0


def test_large_m_dispatch_branches(interpret, monkeypatch):
    """The cuBLAS / semi-structured branches, reachable on CPU by allowing fast paths."""
    from tensorpress.kernels import w4a16
    monkeypatch.setattr(_env, "fast_paths_allowed", lambda: True)
    monkeypatch.setattr(configs, "THRESHOLDS", dict(configs.THRESHOLDS, fused_max_m=4, lowrank_max_m=4,
                                                    sparse_max_m=4))
    w4 = _env.kernel_module("w4a16")

    def forbid(*a, **k):
        raise AssertionError("fused kernel called above fused_max_m")
    monkeypatch.setattr(w4, "matmul", forbid)
    L = random_w4(40, 96, 32, rank=16, bias=True, dtype=torch.float32, act_order=True)
    x = torch.randn(9, 96)
    assert rel_err(ops.quant_linear(x, **L), reference.quant_linear(x.double(), **{
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v
        for k, v in L.items()})) < 1e-5                                    # Triton dequantise + matmul
    with pytest.raises(AssertionError, match="fused kernel"):
        ops.quant_linear(x[:4].half(), **L)                                # M ≤ fused_max_m → fused kernel
    ops.quant_linear(x[:2], **L)                                           # fp32 past the GEMV → cuBLAS
    assert w4a16 is w4
    d, u = torch.randn(8, 96), torch.randn(40, 8)
    assert torch.equal(ops.lowrank_linear(x, d, u), reference.lowrank_linear(x, d, u))
    S = random_24(32, 64, dtype=torch.float32)
    xs = torch.randn(9, 64)
    assert torch.equal(ops.sparse24_linear(xs, **S), reference.sparse24_linear(xs, **S))   # CPU: no semi-structured


def test_lowrank_module_dispatch(interpret, monkeypatch):
    from tensorpress.kernels import lowrank
    from tensorpress.nn.modules import LowRankLinear
    mod = LowRankLinear(64, 40, True, 16)
    mod.down.data.normal_(), mod.up.data.normal_(), mod.bias.data.normal_()
    calls = []
    orig = lowrank.fused
    monkeypatch.setattr(lowrank, "fused", lambda *a, **k: calls.append(1) or orig(*a, **k))
    x = torch.randn(3, 64)
    y = mod(x)
    assert calls == [1]                                   # small M: the one-launch fused kernel
    assert rel_err(y, reference.lowrank_linear(x.double(), mod.down.double(), mod.up.double(),
                                                mod.bias.double())) < 1e-5


def test_reference_backend_forces_reference_everywhere(interpret, launches, monkeypatch):
    """``TENSORPRESS_BACKEND=reference`` wins over everything: no Triton launch for any op, even
    where the interpreter would run one, and the outputs are the reference's bit for bit."""
    monkeypatch.setenv("TENSORPRESS_BACKEND", "reference")
    for op, args in _op_cases():
        name = op._qualname.split("::")[1]
        assert torch.equal(op(*args), getattr(reference, name)(*args)), name
    assert launches == []
    monkeypatch.setenv("TENSORPRESS_BACKEND", "interpret")           # control: the same calls launch
    ops._lowrank_linear(*_op_cases()[3][1])
    assert launches


class _FakeCuda:
    device = torch.device("cuda", 0)


@pytest.mark.parametrize("backend,cap,expect", [("auto", (9, 0), True), ("auto", (8, 0), True),
                                                 ("auto", (7, 5), False), ("reference", (9, 0), False)])
def test_device_dispatch_by_capability(monkeypatch, backend, cap, expect):
    """CUDA tensors take the Triton family on sm_80+ only (pre-Ampere: the reference)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TENSORPRESS_BACKEND", backend)
    monkeypatch.setattr(_env, "_capability", lambda index: cap)
    assert _env.use_triton(_FakeCuda()) is expect
    assert _env.device_key(_FakeCuda.device) == f"sm{cap[0]}{cap[1]}"
