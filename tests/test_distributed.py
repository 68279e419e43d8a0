"""Distributed calibration (torchrun, 2 CPU ranks over gloo) against a single process.

One torchrun launch of this file (``__main__`` below: process start-up is most of the cost) runs every
distributed case of the Python API and writes the results (safetensors, JSON); a second launch runs the
CLI, ``torchrun -m tensorpress compress ...`` (which joins the process group itself, from torchrun's
environment), and writes a checkpoint. The tests compare them with single-process runs of the same
recipes on the same samples, made here. A launch that hangs is killed with its ranks and fails.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import VOCAB, make_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BS = 3                        # 20 samples in batches of 3: 7 batches, the last one short; ranks get 3 and 4
N_SAMPLES, SEQ = 20, 256      # 5120 tokens > 4096 input-sample rows: the reservoir merge selects
RECIPES = {
    "gptq": "gptq-w4g64",                      # Gram (act order, static groups, clip search)
    "wanda": "wanda-50",                       # input norms
    "fwsvd": "fwsvd-p50",                      # Fisher (dense statistics)
    "svdllm-sensitivity": "svdllm-p80-sensitivity",   # sensitivity rank allocation
    "svdquant": {"name": "sq", "stages": [{"method": "svdquant", "rank": 8, "bits": 4, "group_size": 32,
                                           "act_bits": 16, "alpha_grid": 4, "iterations": 4}]},  # input_sample
}
STATS_X = dict(n=10, t=12, d=16, bs=3, sample_rows=20)   # 120 tokens in 4 batches, 20 kept


def _samples():
    return torch.randint(0, VOCAB, (N_SAMPLES, SEQ), generator=torch.Generator().manual_seed(5))


def _probe():
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(6))


def _compress(key: str, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compress a fresh tiny Llama with recipe ``key``; its compressed tensors, effective weights, logits."""
    from tensorpress.compress.apply import compress_model
    from tensorpress.recipe import Recipe
    model = make_tiny("llama")
    compress_model(model, Recipe.load(RECIPES[key]), samples, batch_size=BS, progress=False)
    return _tensors(model)


def _tensors(model) -> dict[str, torch.Tensor]:
    from tensorpress.nn import CompressedLinear
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            out[f"{name}#effective"] = m.effective_weight().detach()
            for t, v in m._tensors():
                out[f"{name}.{t}"] = v.detach()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):          # SVDQuant folds its smoothing vectors into the norms
            out[name] = p.detach()
    with torch.no_grad():
        out["#logits"] = model(_probe()).logits.float()
    return out


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))


def _stats_inputs():
    c = STATS_X
    return torch.randn(c["n"], c["t"], c["d"], generator=torch.Generator().manual_seed(3))


def _linears():
    torch.manual_seed(0)
    return {n: torch.nn.Linear(STATS_X["d"], 8) for n in ("a", "b", "c")}


def _collect(x: torch.Tensor, batch_offset: int = 0):
    """Forward statistics of three linears (a and b read the same tensor, c another) over x in batches."""
    from tensorpress.calib.collectors import InputCollector
    lins = _linears()
    needs = {n: {"gram", "abs_mean", "abs_max", "input_sample"} for n in lins}
    with InputCollector(lins, needs, sample_rows=STATS_X["sample_rows"], batch_offset=batch_offset) as col:
        for s in range(0, len(x), STATS_X["bs"]):
            xb = x[s:s + STATS_X["bs"]]
            lins["a"](xb), lins["b"](xb), lins["c"](xb * 2)
            col.next_batch()
    return col


# --- the distributed side: run by torchrun, one process per rank -------------------------------------

def _cli_args(d: Path) -> list[str]:
    return ["compress", str(d / "model"), "-r", "gptq-w4g64", "-o", str(d / "out"), "--calib",
            str(d / "calib.safetensors"), "--samples", "8", "--seq-len", "64", "--batch-size", "3",
            "--no-eval", "--threads", "1", "-q"]


def _cli_inputs(d: Path) -> torch.Tensor:
    from safetensors.torch import save_file
    make_tiny("qwen2").save_pretrained(d / "model")
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(7))
    save_file({"input_ids": ids}, str(d / "calib.safetensors"))
    return ids


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    from tensorpress.calib import distributed as dist
    from tensorpress.calib.collectors import LinearStats
    from tensorpress.errors import TensorpressError
    from tensorpress.nn import LowRankLinear

    assert dist.launched() and dist.init() == 2
    r = dist.rank()
    me = out / f"rank{r}"
    me.mkdir(parents=True)
    report = {"rank": r, "world": dist.world_size()}

    # statistics: collectors over this rank's batches, then the all-reduce
    x = dist.shard_samples(_stats_inputs(), STATS_X["bs"])
    report["stats_batch_offset"], report["stats_shard"] = dist.batch_offset(), len(x)
    col = _collect(x, dist.batch_offset())
    dist.all_reduce_stats(col.stats, STATS_X["sample_rows"])
    fisher = {"m": LinearStats(4, n_tokens=r + 1, fisher_in=torch.full((4,), r + 1.0, dtype=torch.float64),
                               fisher_out=torch.arange(3, dtype=torch.float64) * (r + 1))}
    dist.all_reduce_stats(fisher)
    t = {"fisher.in": fisher["m"].fisher_in, "fisher.out": fisher["m"].fisher_out}
    report["fisher_n"] = fisher["m"].n_tokens
    for n, st in col.stats.items():
        t.update({f"{n}.gram": st.gram_sum, f"{n}.abs_sum": st.abs_sum, f"{n}.abs_max": st.abs_max,
                  f"{n}.sample": st.sample, f"{n}.keys": st.sample_keys})
        report[f"{n}.n_tokens"], report[f"{n}.group"] = st.n_tokens, st.extra["input_group"]

    # errors: a statistic only one rank has, more ranks than batches (every rank raises, none hangs)
    for what, call in (("missing", lambda: dist.all_reduce_stats(
                            {"z": LinearStats(4, gram_sum=torch.ones(4, 4, dtype=torch.float64) if r == 0 else None)})),
                       ("shard", lambda: dist.shard_samples(torch.zeros(1, 4), 1))):
        try:
            call()
            report[f"error.{what}"] = None
        except TensorpressError as e:
            report[f"error.{what}"] = str(e)

    # broadcast: rank 1's module has another rank (structure), values differ: it becomes rank 0's
    m = LowRankLinear(8, 6, True, 2 + r)
    for p in m.parameters():
        p.data.normal_(generator=torch.Generator().manual_seed(10 + r))
    m = dist.broadcast_module(m)
    t.update({f"bcast.{k}": v.detach() for k, v in m.state_dict().items()})
    t["bcast_tensor"] = dist.broadcast_(torch.full((3,), float(r)))
    _save(me / "stats.safetensors", t)

    # the compression pipeline on this rank's share of the samples
    for key in RECIPES:
        _save(me / f"{key}.safetensors", _compress(key, dist.shard_samples(_samples(), BS)))
    report["compress_batch_offset"] = dist.batch_offset()
    dist.finish()
    report["group_closed"] = not torch.distributed.is_initialized()
    (me / "report.json").write_text(json.dumps(report))


# --- launching ---------------------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc): torchrun starts each rank in its own session, so
    killing torchrun's process group leaves the ranks running (and holding our pipes open)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TENSORPRESS_DEBUG": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a hung collective: kill torchrun AND its ranks (they live in sessions of their own), then
        # collect what they printed, with a bound (an unkillable leftover must not hang the suite)
        for pid in [*_descendants(p.pid), p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            stdout, stderr = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", "(no output: the pipes stayed open)"
        raise AssertionError(f"torchrun {' '.join(map(str, args))} ran over {timeout} s; stderr:\n"
                             f"{(stderr or '')[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = _torchrun(Path(__file__).resolve(), out)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def cli_launch(tmp_path_factory):
    """``torchrun --nproc-per-node 2 -m tensorpress compress ...``: its own launch, as users run it (one
    process group per process; a group re-created in one process would meet the first one's stale
    rendezvous keys in torchrun's store)."""
    cli = tmp_path_factory.mktemp("cli")
    ids = _cli_inputs(cli)
    r = _torchrun("-m", "tensorpress", *_cli_args(cli))
    assert r.returncode == 0, r.stderr[-4000:]
    return cli, ids, r


@pytest.fixture
def ranks(launch):
    for r in (0, 1):
        assert _report(launch, r)["group_closed"]
    return launch


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def _report(ranks: Path, r: int) -> dict:
    return json.loads((ranks / f"rank{r}" / "report.json").read_text())


# --- tests -------------------------------------------------------------------------------------------

def test_single_process_helpers_are_noops(monkeypatch):
    from tensorpress.calib import distributed as dist
    from tensorpress.calib.collectors import LinearStats
    from tensorpress.nn import LowRankLinear
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.launched() and not dist.active()
    assert dist.init() == 1 and not torch.distributed.is_initialized()
    assert (dist.world_size(), dist.rank(), dist.is_main(), dist.batch_offset()) == (1, 0, True, 0)
    x = torch.arange(10)
    assert dist.shard_samples(x, 3) is x and dist.batch_offset() == 0
    st = {"a": LinearStats(4, n_tokens=5, gram_sum=torch.eye(4, dtype=torch.float64))}
    g = st["a"].gram_sum
    assert dist.all_reduce_stats(st) is st and st["a"].gram_sum is g and st["a"].n_tokens == 5
    m = LowRankLinear(8, 6, True, 2)
    assert dist.broadcast_module(m) is m
    t = torch.ones(3)
    assert dist.broadcast_(t) is t
    dist.barrier()
    dist.close()
    monkeypatch.setenv("WORLD_SIZE", "1")         # torchrun with one process: single-process path
    assert not dist.launched() and dist.init() == 1


def test_all_reduce_stats_equals_one_process(ranks):
    """Sums, max and the input sample of two ranks' batches equal one process's over all batches."""
    ref = _collect(_stats_inputs()).stats
    r0, r1 = _load(ranks / "rank0" / "stats.safetensors"), _load(ranks / "rank1" / "stats.safetensors")
    rep0, rep1 = _report(ranks, 0), _report(ranks, 1)
    assert (rep0["stats_batch_offset"], rep0["stats_shard"]) == (0, 6)     # batches 0-1 | 2-3 (the short one)
    assert (rep1["stats_batch_offset"], rep1["stats_shard"]) == (2, 4)
    for n, st in ref.items():
        for got, rep in ((r0, rep0), (r1, rep1)):
            assert torch.allclose(got[f"{n}.gram"], st.gram_sum, rtol=1e-12, atol=0)
            assert torch.allclose(got[f"{n}.abs_sum"], st.abs_sum, rtol=1e-12, atol=0)
            assert torch.equal(got[f"{n}.abs_max"], st.abs_max)
            # the same rows, in the same order, with the same keys: keys follow the global batch
            assert got[f"{n}.sample"].shape == (STATS_X["sample_rows"], STATS_X["d"])
            assert torch.equal(got[f"{n}.keys"], st.sample_keys) and torch.equal(got[f"{n}.sample"], st.sample)
            assert rep[f"{n}.n_tokens"] == st.n_tokens == STATS_X["n"] * STATS_X["t"]
        assert torch.equal(r0[f"{n}.gram"], r1[f"{n}.gram"]) and torch.equal(r0[f"{n}.sample"], r1[f"{n}.sample"])
    # the reservoir is a real selection (not every token) drawn from both ranks' batches
    rows = _stats_inputs().reshape(-1, STATS_X["d"])
    idx = [int(((rows - s).abs().sum(1) == 0).nonzero()[0]) for s in r0["a.sample"]]
    assert idx == sorted(idx) and {i // (STATS_X["bs"] * STATS_X["t"]) for i in idx} & {0, 1} and \
        {i // (STATS_X["bs"] * STATS_X["t"]) for i in idx} & {2, 3}
    assert torch.equal(r0["a.sample"], r0["b.sample"]) and not torch.equal(r0["a.sample"], r0["c.sample"])
    assert rep0["a.group"] == rep0["b.group"] != rep0["c.group"]
    for got, rep in ((r0, rep0), (r1, rep1)):                  # Fisher: sums of both ranks'
        assert torch.equal(got["fisher.in"], torch.full((4,), 3.0, dtype=torch.float64))
        assert torch.equal(got["fisher.out"], torch.arange(3, dtype=torch.float64) * 3)
        assert rep["fisher_n"] == 3


def test_errors_raise_on_every_rank(ranks):
    for r in (0, 1):
        rep = _report(ranks, r)
        assert "missing on some ranks" in rep["error.missing"]
        assert "2 ranks but only 1 calibration batch" in rep["error.shard"]


def test_broadcast_module_gives_rank0s_module(ranks):
    r0, r1 = _load(ranks / "rank0" / "stats.safetensors"), _load(ranks / "rank1" / "stats.safetensors")
    keys = [k for k in r0 if k.startswith("bcast")]
    assert keys and keys == [k for k in r1 if k.startswith("bcast")]
    assert r0["bcast.down"].shape == (2, 8)                     # rank 1 (rank 3) was rebuilt as rank 0's
    assert all(torch.equal(r0[k], r1[k]) for k in keys)
    assert torch.equal(r1["bcast_tensor"], torch.zeros(3))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _compare(got: dict, ref: dict, key: str) -> None:
    """Compressed models equal up to floating-point summation order; quantised codes may flip at ties."""
    assert got.keys() == ref.keys(), key
    eff = [k for k in ref if k.endswith("#effective")]
    assert eff, key
    for k in eff:
        assert _rel(got[k], ref[k]) < 1e-5, (key, k, _rel(got[k], ref[k]))
    for k, v in ref.items():
        if v.dtype in (torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool):
            assert (got[k] == v).float().mean() > 0.99, (key, k)
        elif not k.endswith("#effective"):
            assert _rel(got[k], v) < 1e-5, (key, k, _rel(got[k], v))


@pytest.mark.parametrize("key", list(RECIPES))
def test_compress_matches_single_process(ranks, key):
    ref = _compress(key, _samples())
    r0, r1 = _load(ranks / "rank0" / f"{key}.safetensors"), _load(ranks / "rank1" / f"{key}.safetensors")
    for k in r0:                                  # rank 0's modules were broadcast: every rank holds them
        assert torch.equal(r0[k], r1[k]), (key, k)
    _compare(r0, ref, key)
    # a run on rank 0's batches alone is measurably different: the comparison above can fail
    alone = _compress(key, _samples()[:3 * BS])
    assert max(_rel(alone[k], ref[k]) for k in ref if k.endswith("#effective")) > 1e-3, key
    assert _report(ranks, 1)["compress_batch_offset"] == 3


def test_torchrun_cli_matches_single_process(cli_launch):
    """``tensorpress compress`` under torchrun: rank 0 alone prints and writes one checkpoint, equal to a
    single-process compression on the same samples."""
    from tensorpress.checkpoint import load
    from tensorpress.compress.apply import compress_model
    from tensorpress.modeling import load_model
    from tensorpress.recipe import Recipe
    cli, ids, r = cli_launch
    assert r.stdout.count("compressed 14 linears") == 1 and r.stdout.count("checkpoint:") == 1, r.stdout
    report = json.loads((cli / "out" / "report.json").read_text())
    assert report["processes"] == 2 and report["calibration_samples"] == [8, 64]
    assert sorted(p.name for p in cli.iterdir()) == ["calib.safetensors", "model", "out"]
    ref, _ = load_model(cli / "model")
    compress_model(ref, Recipe.load("gptq-w4g64"), ids, batch_size=3, progress=False)
    _compare(_tensors(load(cli / "out")), _tensors(ref), "cli")


if __name__ == "__main__":           # one rank of the torchrun launch in the `ranks` fixture
    _worker(Path(sys.argv[1]))
