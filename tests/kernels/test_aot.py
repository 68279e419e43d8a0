"""Ahead-of-time compilation of every config-table row for sm_90 and sm_80 (CPU-only GPU compile check).

Interpreted kernels cannot be compiled, so this runs ``python -m tensorpress.kernels.aot`` in a
subprocess with ``TRITON_INTERPRET`` unset (one process for both targets).
"""
import json
import os
import subprocess
import sys

import pytest

from tensorpress.kernels import configs

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = (90, 80)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TENSORPRESS_BACKEND")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    targets = [a for cc in TARGETS for a in ("--target", str(cc))]
    r = subprocess.run([sys.executable, "-m", "tensorpress.kernels.aot", *targets, "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), (r.stdout[-3000:], r.stderr[-3000:])
    return r, json.loads(out.read_text())


@pytest.mark.parametrize("cc", TARGETS)
def test_every_config_compiles(cc, compiled):
    r, results = compiled
    results = [x for x in results if x["target"] == f"sm_{cc}"]
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
    # every low-rank form and split-K reduction mode of the W4A16 kernels is compiled
    for kernel in ("_w4a16_gemv_kernel", "_w4a16_gemm_kernel"):
        forms = {(v.split("lr=")[1].split()[0], v.split("reduce=")[1]) for v in
                 (x["variant"] for x in results if x["kernel"] == kernel) if "lr=" in v}
        assert {("fused", "0"), ("fused", "1"), ("fused", "2"), ("t", "2")} <= forms, (kernel, forms)
    lr = {x["variant"].split("reduce=")[1] for x in results if x["kernel"] == "_lr_fused_kernel"}
    assert lr == {"0", "1", "2"}
    # both activation-quantisation modes, per-group and per-token int8 GEMMs
    assert {x["variant"].split()[-1] for x in results if x["kernel"] == "_act_quant_kernel"} == {"one-pass",
                                                                                                 "two-pass"}
    assert {x["variant"].split()[-1] for x in results if x["kernel"] == "_w4a8_gemm_kernel"} == {"ag=64", "ag=-1"}
    if cc >= 90:   # the benchmark's decode target dtype: bf16 W4A16 with the fused rank-32 term
        for kernel in ("_w4a16_gemv_kernel", "_w4a16_gemm_kernel"):
            assert any("bfloat16 lr=fused r=32" in x["variant"] for x in results if x["kernel"] == kernel), kernel
