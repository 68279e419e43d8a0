"""benchmarks/_common.py: the row loop every benchmark runs (reuse, copied rows, atomic row files) and
the recorded command line (no local values)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common  # noqa: E402


def test_run_rows_runs_reuses_copies_and_finishes(tmp_path):
    (tmp_path / "kept.json").write_text(json.dumps({"row": "kept", "ppl": 1.0}))
    (tmp_path / "stale.json").write_text(json.dumps({"row": "stale", "ppl": 9.0}))
    ran = []

    def run(name):
        ran.append(name)
        return {"row": name, "ppl": 2.0, "compress_seconds": 3.0}

    _common.run_rows(["kept", "stale", "new", "copied"], tmp_path, run, reuse=True,
                     keep=lambda name, f: name != "stale",
                     stored=lambda name: {"row": name, "ppl": 4.0, "copied_from": "x/y.json"} if name == "copied" else None,
                     finish=lambda name, res: {**res, "finished": name})
    assert ran == ["stale", "new"]                       # kept: reused; copied: not run
    rows = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert rows["kept"] == {"row": "kept", "ppl": 1.0}   # untouched
    assert rows["stale"]["ppl"] == 2.0 and rows["stale"]["finished"] == "stale" and "date" in rows["stale"]
    assert rows["copied"]["copied_from"] == "x/y.json" and "date" not in rows["copied"]   # keeps its own provenance
    assert not list(tmp_path.glob("*.tmp"))


def test_run_rows_without_reuse_reruns_and_a_failed_row_leaves_no_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"row": "a", "ppl": 1.0}))

    def run(name):
        if name == "b":
            raise SystemExit("row b failed")
        return {"row": name, "ppl": 5.0}

    with pytest.raises(SystemExit, match="row b failed"):
        _common.run_rows(["a", "b"], tmp_path, run)
    assert json.loads((tmp_path / "a.json").read_text())["ppl"] == 5.0
    assert not (tmp_path / "b.json").exists() and not list(tmp_path.glob("*.tmp"))


def test_public_args_hide_local_values():
    argv = ["--work", "/somewhere/local", "--out=/x/y", "--threads", "2", "--note", "free text", "--rows", "a"]
    assert _common.public_args(argv) == ["--work", "DIR", "--out=DIR", "--threads", "2", "--note", "…", "--rows", "a"]
    assert _common.public_args(argv, _common.DIR_ARGS)[-4:] == ["--note", "free text", "--rows", "a"]


def test_pruning_no_worse_check_allows_only_float_noise():
    import pruning
    by = lambda ours, peer: {"wanda-50": {"row": "wanda-50", "ppl": ours},              # noqa: E731
                             "llmc-wanda-50": {"row": "llmc-wanda-50", "ppl": peer}}
    check = lambda b: next(c for c in pruning.checks(b) if c[0].startswith("Wanda 50%"))  # noqa: E731
    assert check(by(31.0, 31.5))[1] is True and "tie" not in check(by(31.0, 31.5))[2]
    tie = check(by(123.3730, 123.3725))
    assert tie[1] is True and "a tie" in tie[2]
    assert check(by(31.10, 31.0))[1] is False                       # 0.3 % worse: not noise
    assert check({})[1] is None


def test_stored_row_takes_the_first_directory_and_names_its_origin(tmp_path):
    from _common import stored_row
    for d, ppl in (("b_rows", 2.0), ("c_rows", 3.0)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.json").write_text(json.dumps({"row": "x", "ppl": ppl}))
    assert stored_row(tmp_path, "x", ("a_rows", "b_rows", "c_rows")) == {
        "row": "x", "ppl": 2.0, "copied_from": "benchmarks/results/b_rows/x.json"}
    assert stored_row(tmp_path, "x", ("c_rows",), key="adopted_from")["adopted_from"].endswith("c_rows/x.json")
    assert stored_row(tmp_path, "y", ("b_rows",)) is None


def test_write_tokens_never_reuses_other_tokens(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    import tensorpress.calib.data as data
    monkeypatch.setattr(data, "calibration_samples", lambda tok, n, L, seed=None: torch.arange(n * L).view(n, L))
    monkeypatch.setattr(data, "eval_windows", lambda tok, n, L: torch.ones(n, L, dtype=torch.long))
    p, _ = _common.write_tokens(tmp_path, None, 4, 8, 2)
    first = p.stat().st_mtime_ns
    assert _common.write_tokens(tmp_path, None, 4, 8, 2)[0].stat().st_mtime_ns == first      # same tokens: kept
    _common.write_tokens(tmp_path, None, 2, 8, 2)                                             # other protocol
    assert load_file(p)["calib"].shape == (2, 8) and not list(tmp_path.glob("*.tmp"))
