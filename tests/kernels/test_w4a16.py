"""W4A16 (+ low-rank) Triton kernels under the interpreter vs the reference (fp64 oracle)."""
import pytest
import torch

from tensorpress.kernels import ops, reference
from tensorpress.kernels.testing import poisoned, random_w4, rel_err

pytest.importorskip("triton")

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
TOL = {F16: 3e-3, F32: 2e-5, BF16: 1.6e-2}      # bf16: the interpreter truncates fp32 → bf16 (≤ 2 ulp)


def oracle(x, L):
    """Reference in float64 (scales stay fp16: they are part of the format)."""
    d = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v
         for k, v in L.items()}
    return reference.quant_linear(x.double(), **d)


def poison_all(L: dict) -> dict:
    """Every strided input as a view into a padded buffer (NaN / −1 padding): OOB reads show up."""
    return {k: poisoned(v.shape, v.dtype).copy_(v) if isinstance(v, torch.Tensor) else v for k, v in L.items()}


# M, N, K, group, sym, act_order, rank, bias, dtype
CASES = [
    (1, 96, 200, 32, True, False, 16, True, F16),      # GEMV, split-K, K tail inside a tile
    (1, 130, 100, 32, False, False, 0, False, F32),    # ragged last group (96..99), K % 8 ≠ 0, N % 8 ≠ 0
    (1, 64, 256, 64, False, True, 32, True, F16),      # act-order g_idx
    (1, 72, 192, -1, True, False, 32, False, BF16),    # one group per row; bf16 split-K via fp32 buffer
    (3, 96, 256, 128, False, False, 32, True, F16),    # tl.dot GEMM, small M, split-K
    (16, 130, 192, 64, True, True, 16, False, F32),    # GEMM act-order, N tail
    (33, 96, 256, -1, False, False, 0, True, BF16),    # M tail (BLOCK_M 16)
    (5, 100, 100, 32, True, False, 16, True, F16),     # GEMM with K % 8 ≠ 0
    (4, 64, 160, 40, False, False, 32, False, F32),    # group not a power of two: per-row scales
]


@pytest.mark.parametrize("m,n,k,group,sym,act,rank,bias,dtype", CASES)
def test_quant_linear_matches_reference(interpret, m, n, k, group, sym, act, rank, bias, dtype):
    L = random_w4(n, k, group, sym=sym, act_order=act, rank=rank, bias=bias, dtype=dtype, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    y = ops.quant_linear(x, **L)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, oracle(x, L)) < TOL[dtype]


def test_leading_dims_and_module_dispatch(interpret):
    from tensorpress.nn.modules import QuantLinear
    L = random_w4(48, 64, 32, rank=16, bias=True, dtype=F32)
    mod = QuantLinear(64, 48, True, 4, 32, rank=16)
    mod.qweight.copy_(L["qweight"]), mod.scales.copy_(L["scales"]), mod.qzeros.copy_(L["qzeros"])
    mod.bias.data.copy_(L["bias"])
    mod.set_correction(L["lr_down"], L["lr_up"])
    x = torch.randn(2, 3, 64)
    y = mod(x)                                             # QuantLinear.forward → ops.quant_linear → Triton
    assert y.shape == (2, 3, 48)
    assert rel_err(y, oracle(x, L)) < TOL[F32]


@pytest.mark.parametrize("path,m,split,group,act", [
    ("gemv", 3, 1, 64, False),       # several rows per GEMV grid, plain stores
    ("gemv", 3, 3, 20, False),       # atomics, per-row groups (20: no power-of-two BLOCK_K divides it)
    ("gemv", 1, 2, 64, True),
    ("gemm", 20, 1, 64, False),
    ("gemm", 20, 4, 32, True),
])
def test_launch_poisoned(interpret, path, m, split, group, act):
    """Inputs padded with NaN/−1 (an out-of-bounds read poisons the result), output poisoned too:
    every element must be written (split-K is reduced in the kernel, no zero-fill) and the padding
    left alone. Low-rank term from a precomputed ``t`` (the two-kernel form)."""
    from tensorpress.kernels import _tl, lowrank, w4a16
    n, k = 100, 192
    L = random_w4(n, k, group, sym=False, act_order=act, rank=32, bias=True, dtype=F32, seed=split)
    P = poison_all(L)
    x = poisoned((m, k), F32).copy_(torch.randn(m, k))
    t = lowrank.down(x, P["lr_down"], cfg=dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=32, SPLIT_K=3))
    assert t.shape == (3, m, 32)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split)
    launch = w4a16.matmul_launch(x, P["qweight"], P["scales"], P["qzeros"], P["g_idx"], group, P["bias"], t,
                                 P["lr_up"], path, cfg)
    assert launch.consts["LR"] == 1 and launch.consts["REDUCE"] == (_tl.SERIAL if split > 1 else _tl.STORE)
    y = poisoned((m, n), F32)
    launch.args.update(y_ptr=y, stride_ym=y.stride(0))
    launch()
    assert rel_err(y, oracle(x, L)) < TOL[F32]
    base = y._base
    assert torch.isnan(base[:, :4]).all() and torch.isnan(base[:, 4 + n:]).all()


@pytest.mark.parametrize("n,k,group,act,dtype", [(100, 200, 32, False, F32), (64, 256, 64, True, F32),
                                                  (72, 100, -1, False, F16), (40, 160, 40, False, F32)])
def test_dequantize_kernel_exact(interpret, n, k, group, act, dtype):
    L = random_w4(n, k, group, sym=False, act_order=act, dtype=dtype)
    args = (L["qweight"], L["scales"], L["qzeros"], L["g_idx"], 4, group, k)
    from tensorpress.kernels import w4a16
    w = ops.dequantize_weight(*args, dtype=dtype)
    ref = reference.dequantize_weight(*args, dtype=dtype)
    assert w.shape == (n, k) and w.is_contiguous()
    assert torch.equal(w, ref)                                       # s·(q − z) is exact
    launch = w4a16.dequantize_launch(*args[:4], group, k, dtype)     # poisoned [K, N] output
    out = poisoned((k, n), dtype)
    launch.args.update(w_ptr=out, stride_wk=out.stride(0))
    launch()
    assert torch.equal(out.t(), ref) and torch.isnan(out._base[:, :4]).all() and torch.isnan(out._base[:, 4 + n:]).all()


def test_other_bit_widths_fall_back(interpret):
    from tensorpress.packing import pack_bits
    codes = torch.randint(0, 8, (64, 24), dtype=torch.int32)
    args = (pack_bits(codes, 3, 0), torch.rand(2, 24).half(), pack_bits(torch.full((2, 24), 4), 3, 1), None, 3, 32, 64)
    x = torch.randn(2, 64)
    assert torch.equal(ops.quant_linear(x, *args), reference.quant_linear(x, *args))
