"""W4A8 + low-rank (SVDQuant path): activation quantisation bit-exact, int8 GEMM vs the reference."""
import pytest
import torch

from tensorpress.kernels import ops, reference
from tensorpress.kernels.testing import poisoned, random_w4, rel_err

pytest.importorskip("triton")


def layer(n, k, group, **kw):
    L = random_w4(n, k, group, **kw)
    L.pop("bits")
    return L


def oracle(x, L, **kw):
    d = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v
         for k, v in L.items()}
    return reference.w4a8_linear(x.double(), **d, **kw)


@pytest.mark.parametrize("m,k,ag,smooth,dtype", [
    (5, 256, -1, True, torch.float16), (20, 256, 64, False, torch.float32), (3, 100, -1, True, torch.float32),
    (17, 192, 32, True, torch.bfloat16)])
def test_act_quant_bit_exact(interpret, m, k, ag, smooth, dtype):
    from tensorpress.kernels import w4a8
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * 4).to(dtype)
    x[0, : k // 2] = 0                                         # an all-zero group must stay finite
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    down = torch.randn(32, k, generator=g).to(dtype)
    q, sx, t = w4a8.quantize(poisoned((m, k), dtype).copy_(x), None if s is None else 1.0 / s, down, ag)
    q_ref, sx_ref = reference.quantize_activations(x, s, ag)
    assert torch.equal(q, q_ref) and torch.equal(sx, sx_ref)   # same rounding, bit for bit
    assert rel_err(t[0], x.double() @ down.double().t()) < 1e-5


@pytest.mark.parametrize("m,n,k,group,ag,rank,bias,smooth,dtype", [
    (1, 96, 256, 64, -1, 32, True, True, torch.float16),
    (20, 130, 256, 128, 64, 16, False, True, torch.float32),
    (33, 72, 192, 32, 32, 0, True, False, torch.float16),
    (64, 64, 100, -1, -1, 32, True, True, torch.float32),   # per-channel weights, K tail
])
def test_w4a8_linear_matches_reference(interpret, m, n, k, group, ag, rank, bias, smooth, dtype):
    L = layer(n, k, group, sym=False, rank=rank, bias=bias, dtype=dtype, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    s = torch.rand(k) + 0.5 if smooth else None
    y = ops.w4a8_linear(x, **L, smooth=s, act_group_size=ag)
    assert y.dtype == dtype
    assert rel_err(y, oracle(x, L, smooth=s, act_group_size=ag)) < (3e-3 if dtype == torch.float16 else 2e-5)


def test_unsupported_layouts_fall_back_to_reference(interpret):
    L = layer(48, 128, 64, act_order=True, dtype=torch.float32)          # g_idx: no int8 tile grouping
    x = torch.randn(4, 128)
    assert torch.equal(ops.w4a8_linear(x, **L), reference.w4a8_linear(x, **L))
    L = layer(48, 120, 24, dtype=torch.float32)                          # no BLOCK_K ≥ 32 divides 24
    x = torch.randn(4, 120)
    assert torch.equal(ops.w4a8_linear(x, **L), reference.w4a8_linear(x, **L))


def test_gemm_launch_poisoned(interpret):
    from tensorpress.kernels import w4a8
    m, n, k = 20, 100, 128
    L = layer(n, k, 64, sym=False, rank=32, bias=True, dtype=torch.float32)
    P = {a: poisoned(v.shape, v.dtype).copy_(v) if isinstance(v, torch.Tensor) else v for a, v in L.items()}
    x = torch.randn(m, k)
    q, sx, t = w4a8.quantize(x, None, L["lr_down"], 64)
    launch = w4a8.gemm_launch(q, sx, P["qweight"], P["scales"], P["qzeros"], 64, 64, torch.float32, P["bias"], t,
                              P["lr_up"], cfg=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32))
    y = poisoned((m, n), torch.float32)
    launch.args.update(y_ptr=y, stride_ym=y.stride(0))
    launch()
    assert rel_err(y, oracle(x, L, act_group_size=64)) < 2e-5
    assert torch.isnan(y._base[:, :4]).all() and torch.isnan(y._base[:, 4 + n:]).all()


def test_act_quant_outputs_poisoned(interpret):
    """Codes, scales and low-rank activations all written (outputs start as −128, never a code, or NaN),
    M tail included."""
    from tensorpress.kernels import w4a8
    m, k = 19, 192
    x = torch.randn(m, k) * 3
    down = torch.randn(32, k)
    launch = w4a8.act_quant_launch(x, None, down, 64)
    q, sx, t = (torch.full_like(o, -128) if o.dtype == torch.int8 else torch.full_like(o, float("nan"))
                for o in launch.outputs)
    launch.args.update(q_ptr=q, sx_ptr=sx, t_ptr=t)
    launch()
    q_ref, sx_ref = reference.quantize_activations(x, None, 64)
    assert torch.equal(q, q_ref) and torch.equal(sx, sx_ref)
    assert rel_err(t[0], x.double() @ down.double().t()) < 1e-5


@pytest.mark.parametrize("m,k,ag,one_pass", [
    (5, 256, 64, True),      # activation groups of one tile: single pass
    (3, 200, 32, True),      # K tail in the last group
    (4, 64, -1, True),       # per token, the whole row in one tile
    (5, 192, -1, False),     # per token over several tiles: max first, then the codes
])
def test_act_quant_reads_x_once_per_pass(interpret, count_loads, m, k, ag, one_pass):
    """Kernel 1 is the only reader of x: once per element when a group fits a tile (the down-
    projection uses the same loads), twice (max, then codes) only for per-token rows spanning tiles."""
    from tensorpress.kernels import w4a8
    g = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=g) * 3
    down = torch.randn(32, k, generator=g)
    s = torch.rand(k, generator=g) + 0.5
    launch = w4a8.act_quant_launch(x, 1.0 / s, down, ag)
    assert launch.consts["ONE_PASS"] == one_pass
    seen = count_loads(x)
    launch()
    assert torch.all(seen == (1 if one_pass else 2)), seen.unique()
    q, sx, t = launch.outputs
    q_ref, sx_ref = reference.quantize_activations(x, s, ag)
    assert torch.equal(q, q_ref) and torch.equal(sx, sx_ref)
    assert rel_err(t[0], x.double() @ down.double().t()) < 1e-5


def test_w4a8_two_launches_gemm_never_reads_x(interpret, launches, count_loads):
    """Public op: exactly act-quant (+ down-projection) then the int8 GEMM (+ up-projection epilogue),
    x loaded once in all (the GEMM reads the int8 codes)."""
    L = layer(96, 256, 64, sym=False, rank=32, bias=True, dtype=torch.float32)
    x = torch.randn(20, 256)
    s = torch.rand(256) + 0.5
    seen = count_loads(x)
    y = ops.w4a8_linear(x, **L, smooth=s, act_group_size=64)
    assert launches == ["_act_quant_kernel", "_w4a8_gemm_kernel"]
    assert torch.all(seen == 1)
    assert rel_err(y, oracle(x, L, smooth=s, act_group_size=64)) < 2e-5


def test_svdquant_module_dispatch(interpret, launches):
    """``SVDQuantLinear`` with 8-bit activations runs the two W4A8 launches (low-rank branch inside)."""
    from tensorpress.nn.modules import SVDQuantLinear
    L = layer(48, 64, 32, sym=False, rank=16, bias=True, dtype=torch.float32)
    mod = SVDQuantLinear(64, 48, True, 4, 32, sym=False, act_bits=8, act_group_size=32)
    for name in ("qweight", "scales", "qzeros"):
        getattr(mod, name).copy_(L[name])
    mod.bias.data.copy_(L["bias"])
    mod.set_correction(L["lr_down"], L["lr_up"])
    s = torch.rand(64) + 0.5
    mod.smooth.copy_(s)
    x = torch.randn(2, 3, 64)
    y = mod(x)
    assert launches == ["_act_quant_kernel", "_w4a8_gemm_kernel"]
    assert y.shape == (2, 3, 48)
    assert rel_err(y, oracle(x.reshape(6, 64), L, smooth=s, act_group_size=32).reshape(2, 3, 48)) < 2e-5
