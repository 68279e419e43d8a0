"""Ahead-of-time compilation of every config-table row for sm_90 and sm_80 (CPU-only GPU compile check).

Interpreted kernels cannot be compiled, so this runs ``python -m tensorpress.kernels.aot`` in a
subprocess with ``TRITON_INTERPRET`` unset.
"""
import json
import os
import subprocess
import sys

import pytest

from tensorpress.kernels import configs

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("cc", [90, 80])
def test_every_config_compiles(cc, tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TENSORPRESS_BACKEND")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "tensorpress.kernels.aot", "--target", str(cc), "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    results = json.loads(out.read_text())
    failed = [f"{x['variant']}: {x.get('error')}" for x in results if not x["ok"]]
    assert r.returncode == 0 and not failed, (failed, r.stdout[-3000:], r.stderr[-3000:])
    rows = {(k, i) for k, rs in configs.table(f"sm{cc}").items() for i in range(len(rs))}
    seen = {(x["variant"].split("[")[0], int(x["variant"].split("[")[1].split("]")[0])) for x in results}
    assert rows <= seen                                         # every table row was compiled
    for x in results:
        assert x["ptx_bytes"] > 1000 and x["shared"] <= (227 if cc == 90 else 163) * 1024
        assert x.get("stack", 0) == 0, f"{x['variant']} spills ({x.get('regs')} registers)"
    dots = [x for x in results if x["kernel"].startswith(("_w4a16_gemm", "_w4a8_gemm", "_lr_", "_blockdiag"))]
    assert dots and all(x["mma"] for x in dots)                 # tensor cores, not an FMA fallback
