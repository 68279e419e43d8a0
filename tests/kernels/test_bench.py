"""The benchmark harness, run end to end on CPU through the interpreter (``--cpu-check``)."""
import json

import pytest
import torch

from tensorpress.kernels import bench

pytest.importorskip("triton")


def test_cpu_check_runs_the_harness(interpret, tmp_path, capsys):
    rc = bench.main(["--cpu-check", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().out[-3000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    names = {r["impl"] for r in rows}
    assert {"torch_bfloat16", "w4a16", "w4a16+r32", "w4a8+r32", "lowrank_r32", "sparse24", "sparse24+armor32"} <= names
    assert all(r["ok"] and r["us"] > 0 and r["max_rel_err"] < 2e-2 and r["copies"] == 2 for r in rows)
    assert all(r["speedup"] > 0 and r["GBps"] > 0 for r in rows)
    md = (tmp_path / "bench.md").read_text()
    assert "CPU (Triton interpreter" in md and md.count("\n| ") == len(rows) + 1


def test_roofline_arithmetic():
    rows = [{"us": 2.74, "bytes": 9.19e6, "flops": 2 * 4096 * 4096, "peak": "bf16"}]
    bench.add_roofline(rows, {"copy_Bps": 3.0e12, "bf16_flops": 800e12}, bench.SPEC["H100"])
    assert rows[0]["roof_spec_pct"] == pytest.approx(100.1, abs=0.2)         # docs/kernels.md §2.2: 2.74 µs floor
    assert rows[0]["roof_meas_pct"] == pytest.approx(111.8, abs=0.2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_cuda_is_one_line_and_nonzero(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and "\n" not in err


def test_dry_run_needs_no_out(interpret, monkeypatch, capsys):
    """``--dry-run`` (alias of ``--cpu-check``) is one command: without ``--out`` the report goes to a
    temporary directory (harness rows stubbed here; the full CPU run is the test above)."""
    monkeypatch.setattr(bench, "run_rows", lambda *a, **k: [])
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    path = out.split("wrote ")[1].split("/bench.json")[0]
    assert "tensorpress-kernels-cpu-check-" in path
    assert json.loads(open(f"{path}/bench.json").read())["rows"] == []
    import shutil
    shutil.rmtree(path)


def test_benchmark_script_entry_point():
    """``python benchmarks/kernels.py`` imports and parses its arguments from a plain shell."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernels.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--cpu-check" in r.stdout and "--quick" in r.stdout, r.stderr[-2000:]
