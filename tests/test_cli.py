"""The command line: a full run on a tiny model saved to disk, and every error path as one line
with a non-zero exit code, no traceback and no partial output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check_rc=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TENSORPRESS_DEBUG": ""}
    r = subprocess.run([sys.executable, "-m", "tensorpress", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    if check_rc is not None:
        assert r.returncode == check_rc, r.stderr[-2000:]
    return r


def _assert_one_line_error(r, match):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: ") and match in lines[-1], r.stderr[-1500:]
    assert "Traceback" not in r.stderr


def test_full_cli_run(tiny_dir):
    out = tiny_dir / "out"
    r = run("compress", tiny_dir / "model", "--recipe", "gptq-w4g64", "-o", out, "--calib", tiny_dir / "calib.txt",
            "--samples", 4, "--seq-len", 64, "--no-eval", "--threads", 1, "-q", check_rc=0)
    assert "compressed 14 linears" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["threads"] == 1 and report["calibration_samples"] == [4, 64]
    layers = [json.loads(l) for l in (out / "layers.jsonl").read_text().splitlines()]
    assert len(layers) == 14 and all(0 <= l["rel_error"] < 0.5 and l["seconds"] >= 0 for l in layers)
    r = run("inspect", out, "--json", check_rc=0)
    rows = json.loads(r.stdout)
    assert len(rows) == 14 and {row["format"] for row in rows} == {"quant"}
    assert all(4 < row["bits/weight"] < 5 for row in rows)
    # the same output path again: refused, nothing touched
    before = sorted(os.listdir(out))
    _assert_one_line_error(run("compress", tiny_dir / "model", "-r", "rtn-w4g64", "-o", out,
                               "--calib", tiny_dir / "calib.txt", "--no-eval"), "already exists")
    assert sorted(os.listdir(out)) == before


def test_recipes_lists_shipped():
    r = run("recipes", check_rc=0)
    assert "gptq-w4g64" in r.stdout and "svd-p80" in r.stdout


def test_help_is_informative():
    r = run("compress", "--help", check_rc=0)
    assert "--recipe" in r.stdout and "default" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["compress", "MODEL", "-r", "no-such-recipe", "-o", "OUT"], "unknown recipe"),
    (["compress", "MISSING", "-r", "rtn-w4g64", "-o", "OUT"], "does not exist"),
    (["compress", "NOTMODEL", "-r", "rtn-w4g64", "-o", "OUT"], "not a model directory"),
    (["compress", "MODEL", "-r", "BADRECIPE", "-o", "OUT", "--no-eval", "--calib", "CALIB"], "bits"),
    (["compress", "MODEL", "-r", "BIGGROUP", "-o", "OUT", "--no-eval", "--calib", "CALIB"], "cannot apply"),
    (["compress", "MODEL", "-r", "rtn-w4g64", "-o", "OUT", "--no-eval", "--calib", "MISSINGCALIB"], "does not exist"),
    (["eval", "NOTMODEL"], "not a model directory"),
    (["inspect", "NOTMODEL"], "no config.json"),
])
def test_error_paths(tiny_dir, tmp_path, args, match, capsys):
    """In-process through cli.main (the same code the console script runs), for speed."""
    from tensorpress.cli import main
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "bad.yaml").write_text("stages:\n  - method: rtn\n    bits: 12\n")
    (tmp_path / "big.yaml").write_text("stages:\n  - method: rtn\n    group_size: 128\n")
    subst = {"MODEL": tiny_dir / "model", "OUT": tmp_path / "out", "NOTMODEL": tmp_path / "notmodel",
             "MISSING": tmp_path / "missing", "BADRECIPE": tmp_path / "bad.yaml", "BIGGROUP": tmp_path / "big.yaml",
             "CALIB": tiny_dir / "calib.txt", "MISSINGCALIB": tmp_path / "nope.txt"}
    rc = main([str(subst.get(a, a)) for a in args])
    err = capsys.readouterr().err
    _assert_one_line_error(subprocess.CompletedProcess(args, rc, "", err), match)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_bad_argument_is_usage_error():
    r = run("compress", "x", "-r", "y", "-o", "z", "--samples", "-3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "positive integer" in r.stderr


def test_eora_compress_export_adapter_and_bad_rank(tiny_dir, tmp_path, capsys):
    """GPTQ + EoRA from the CLI, exported as GPTQ base + PEFT adapter; a rank above min(out, in) and a
    correction with no base are one-line errors before any work."""
    from tensorpress.cli import main
    rec = tmp_path / "ge.yaml"
    rec.write_text("stages:\n  - method: gptq\n    bits: 4\n    group_size: 32\n  - method: eora\n    rank: 4\n")
    out = tmp_path / "ck"
    assert main(["compress", str(tiny_dir / "model"), "-r", str(rec), "-o", str(out), "--calib",
                 str(tiny_dir / "calib.txt"), "--samples", "4", "--seq-len", "32", "--no-eval", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r.get("rank") == 4 for r in rows), rows[:2]
    assert main(["export", str(out), "-f", "gptq", "-o", str(tmp_path / "g")]) == 0
    cfg = json.loads((tmp_path / "g" / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
    assert main(["export", str(out), "-f", "gptq", "-o", str(tmp_path / "g2"), "--no-adapter"]) == 2
    assert "low-rank corrections" in capsys.readouterr().err and not (tmp_path / "g2").exists()
    assert main(["export", str(out), "-f", "dense", "-o", str(tmp_path / "d")]) == 0   # corrections merged
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    for body, match in (("  - method: gptq\n    bits: 4\n    group_size: 32\n  - method: eora\n    rank: 500\n",
                         "above min(out, in)"),
                        ("  - method: eora\n    rank: 4\n", "no compressed base"),
                        ("  - method: svd-llm\n    budget: {params: 0.0001}\n    allocation: sensitivity\n",
                         "cannot be met")):
        (tmp_path / "bad.yaml").write_text("stages:\n" + body)
        rc = main(["compress", str(tiny_dir / "model"), "-r", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "o2"),
                   "--calib", str(tiny_dir / "calib.txt"), "--samples", "4", "--seq-len", "32", "--no-eval", "-q"])
        err = capsys.readouterr().err
        _assert_one_line_error(subprocess.CompletedProcess([], rc, "", err), match)
        assert not (tmp_path / "o2").exists()
