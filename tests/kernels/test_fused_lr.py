"""One-launch low-rank fusion under the interpreter: W4A16 + low-rank (x·downᵀ computed from the x
tiles the W4A16 kernel loads, up-projection in its epilogue) and the plain low-rank kernel, with
the in-kernel split reduction (serial: no zero-filled output, counters left at zero)."""
import pytest
import torch

from tensorpress.kernels import configs, ops, reference
from tensorpress.kernels.testing import poisoned, random_w4, rel_err

pytest.importorskip("triton")
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
TOL = {F16: 3e-3, F32: 2e-5, BF16: 1.6e-2}


def oracle(x, L):
    d = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v
         for k, v in L.items()}
    return reference.quant_linear(x.double(), **d)


def poison_all(L: dict) -> dict:
    return {k: poisoned(v.shape, v.dtype).copy_(v) if isinstance(v, torch.Tensor) else v for k, v in L.items()}


# path, M, N, K, group, rank, split, reduce, dtype
LAUNCH_CASES = [
    ("gemv", 1, 100, 192, 64, 32, 3, "serial", F32),    # rank = BLOCK_R
    ("gemv", 2, 100, 200, 32, 24, 2, "serial", F16),    # rank < BLOCK_R, K tail, two rows
    ("gemv", 1, 72, 160, 40, 16, 2, "atomic", F32),     # per-row scales (40 ∤ BLOCK_K), atomics
    ("gemv", 1, 96, 128, 64, 64, 1, "serial", BF16),    # one split: plain store
    ("gemm", 20, 100, 192, 64, 32, 3, "serial", F32),   # M tail, N tail
    ("gemm", 5, 72, 200, 32, 48, 2, "atomic", F16),
    ("gemm", 17, 64, 128, 128, 16, 1, "serial", F32),
]


@pytest.mark.parametrize("path,m,n,k,group,rank,split,reduce,dtype", LAUNCH_CASES)
def test_fused_w4a16_launch_poisoned(interpret, path, m, n, k, group, rank, split, reduce, dtype):
    """Inputs padded with NaN (an out-of-bounds read poisons the result); the output and the split
    workspace start as NaN too (serial reduction: no zero-fill, every element written once)."""
    from tensorpress.kernels import _tl, w4a16
    L = random_w4(n, k, group, sym=False, act_order=group == 40, rank=rank, bias=True, dtype=dtype, seed=m + rank)
    P = poison_all(L)
    x = poisoned((m, k), dtype).copy_(torch.randn(m, k, generator=torch.Generator().manual_seed(k)))
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=split, REDUCE=reduce)
    launch = w4a16.matmul_launch(x, P["qweight"], P["scales"], P["qzeros"], P["g_idx"], group, P["bias"], None,
                                 P["lr_up"], path, cfg, down=P["lr_down"])
    mode = {1: _tl.STORE}.get(split, _tl.SERIAL if reduce == "serial" else _tl.ATOMIC)
    assert launch.consts["LR"] == 2 and launch.consts["REDUCE"] == mode
    assert launch.grid[1 if path == "gemv" else 2] == split
    y = poisoned((m, n), dtype)
    out, finish = launch.outputs
    if mode == _tl.ATOMIC:
        y = y.float() if out.dtype == F32 and dtype != F32 else y     # no bf16 atomics: fp32 buffer
    launch.args.update(y_ptr=y, stride_ym=y.stride(0))
    if mode == _tl.SERIAL:
        launch.args["ws_ptr"] = torch.full_like(launch.args["ws_ptr"], float("nan"))
    for _ in range(2):                       # twice: the arrival counters must reset themselves
        if mode == _tl.ATOMIC:
            y.zero_()
        launch()
        assert rel_err(y, oracle(x, L)) < TOL[dtype]
        if mode == _tl.SERIAL:
            assert not launch.args["lock_ptr"].any()
    if y._base is not None:
        assert torch.isnan(y._base[:, :4]).all() and torch.isnan(y._base[:, 4 + n:]).all()


@pytest.mark.parametrize("m,rank,fused", [(1, 32, True), (4, 64, True), (1, 96, False), (70, 16, False)])
def test_dispatch_one_launch(interpret, launches, m, rank, fused):
    """rank ≤ lr_fused_max_rank and M ≤ lr_fused_max_m: the W4A16 kernel alone (no down-projection
    kernel, no zero-filled output); otherwise the down kernel + epilogue."""
    lim = configs.THRESHOLDS
    assert (rank <= lim["lr_fused_max_rank"] and m <= lim["lr_fused_max_m"]) == fused
    L = random_w4(72, 128, 64, rank=rank, bias=True, dtype=F32, seed=rank)
    x = torch.randn(m, 128)
    y = ops.quant_linear(x, **L)
    assert rel_err(y, oracle(x, L)) < TOL[F32]
    main = "_w4a16_gemv_kernel" if m == 1 else "_w4a16_gemm_kernel"
    assert launches == ([main] if fused else ["lowrank.down", "_lr_down_kernel", main])


def test_threshold_zero_disables_fusion(interpret, launches, monkeypatch):
    monkeypatch.setattr(configs, "THRESHOLDS", dict(configs.THRESHOLDS, lr_fused_max_rank=0))
    L = random_w4(64, 128, 64, rank=16, dtype=F16)
    x = torch.randn(1, 128).half()
    assert rel_err(ops.quant_linear(x, **L), oracle(x, L)) < TOL[F16]
    assert launches[0] == "lowrank.down"


# --- plain low-rank, one launch -------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k,r,split,reduce,bias,dtype", [
    (1, 130, 200, 16, None, "serial", True, F16),       # N tail, K tail, one rank slice
    (3, 100, 130, 100, 4, "serial", True, F32),         # rank split, reduced in-kernel; rank tail
    (2, 96, 64, 80, 2, "atomic", False, F32),
    (16, 64, 192, 40, None, "serial", True, BF16),
])
def test_lowrank_fused_poisoned(interpret, m, n, k, r, split, reduce, bias, dtype):
    from tensorpress.kernels import _tl, lowrank
    g = torch.Generator().manual_seed(m * r)
    x = poisoned((m, k), dtype).copy_(torch.randn(m, k, generator=g))
    down = poisoned((r, k), dtype).copy_(torch.randn(r, k, generator=g) / k ** 0.5)
    up = poisoned((n, r), dtype).copy_(torch.randn(n, r, generator=g) * 0.1)
    b = poisoned((n,), dtype).copy_(torch.randn(n, generator=g)) if bias else None
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=32, REDUCE=reduce, **({"SPLIT_R": split} if split else {}))
    launch = lowrank.fused_launch(x, down, up, b, cfg)
    assert launch.grid[2] == split or split is None      # default: split only to fill an H100 (here r=40: 2)
    mode = launch.consts["REDUCE"]
    y = poisoned((m, n), dtype)
    if mode == _tl.ATOMIC:
        y.zero_()
    launch.args.update(y_ptr=y, stride_ym=y.stride(0))
    if mode == _tl.SERIAL:
        launch.args["ws_ptr"] = torch.full_like(launch.args["ws_ptr"], float("nan"))
    launch()
    ref = reference.lowrank_linear(x.double(), down.double(), up.double(), None if b is None else b.double())
    assert rel_err(y, ref) < {F16: 3e-3, F32: 2e-5, BF16: 1.6e-2}[dtype]
    assert torch.isnan(y._base[:, :4]).all() and torch.isnan(y._base[:, 4 + n:]).all()
    if mode == _tl.SERIAL:
        assert not launch.args["lock_ptr"].any()


@pytest.mark.parametrize("m,r,fused", [(3, 48, True), (20, 48, False), (2, 136, False)])
def test_lowrank_dispatch_one_launch(interpret, launches, m, r, fused):
    """Small M and rank ≤ lowrank_fused_max_rank: one launch; otherwise down kernel + up kernel."""
    lim = configs.THRESHOLDS
    assert (m <= lim["lowrank_fused_max_m"] and r <= lim["lowrank_fused_max_rank"]) == fused
    g = torch.Generator().manual_seed(r)
    down, up, b = torch.randn(r, 96, generator=g), torch.randn(80, r, generator=g), torch.randn(80, generator=g)
    x = torch.randn(m, 96, generator=g)
    y = ops.lowrank_linear(x, down, up, b)
    assert rel_err(y, reference.lowrank_linear(x.double(), down.double(), up.double(), b.double())) < 2e-5
    assert launches == (["_lr_fused_kernel"] if fused else ["lowrank.down", "_lr_down_kernel", "_lr_up_kernel"])


def test_reduce_mode_counters():
    pytest.importorskip("triton")
    from tensorpress.kernels import _tl
    dev = torch.device("cpu")
    assert _tl.reduce_mode({}, 1, 10, dev) == (_tl.STORE, None)
    assert _tl.reduce_mode({"REDUCE": "atomic"}, 4, 10, dev) == (_tl.ATOMIC, None)
    mode, buf = _tl.reduce_mode({}, 4, 10, dev)
    assert mode == _tl.SERIAL and buf.dtype == torch.int32 and buf.numel() >= 10 and not buf.any()
    assert _tl.reduce_mode({}, 4, 10, dev)[1] is buf                    # persistent
    big = _tl.reduce_mode({}, 4, buf.numel() + 1, dev)[1]                # grows when needed
    assert big.numel() > buf.numel() and not big.any()


@pytest.mark.parametrize("path,m,split", [("gemv", 1, 3), ("gemv", 2, 1), ("gemm", 20, 2)])
def test_fused_lr_adds_no_read_of_x(interpret, count_loads, path, m, split):
    """The fused down-projection uses the x registers the W4A16 product loads: with the low-rank
    term every element of x is loaded exactly as often as without it — once per output tile."""
    from tensorpress.kernels import w4a16
    n, k = 100, 192
    L = random_w4(n, k, 64, rank=32, bias=True, dtype=F32, seed=m)
    x = torch.randn(m, k)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=split)
    seen = count_loads(x)
    plain = w4a16.matmul_launch(x, L["qweight"], L["scales"], L["qzeros"], None, 64, L["bias"], path=path, cfg=cfg)
    plain()
    once = seen.clone()
    n_tiles = -(-n // 32)
    assert torch.all(once == n_tiles)
    fused = w4a16.matmul_launch(x, L["qweight"], L["scales"], L["qzeros"], None, 64, L["bias"], None, L["lr_up"],
                                path, cfg, down=L["lr_down"])
    assert fused.consts["LR"] == 2
    fused()
    assert torch.equal(seen - once, once)
    y, finish = fused.outputs
    assert rel_err(finish(y), oracle(x, L)) < TOL[F32]
