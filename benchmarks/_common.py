"""Small helpers shared by the benchmarks (protocol token file, machine line, table cells)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def write_tokens(work: Path, tok, samples: int = 128, seq_len: int = 512, eval_windows: int = 40):
    """The protocol's calibration samples and evaluation windows, written once to
    ``work/tokens.safetensors`` so that every row and every tool reads the same tokens. A file already
    there is kept only when it holds exactly these tokens (a scratch directory reused with other
    ``--samples`` or windows gets a fresh file, never the old tokens); written atomically.
    Returns ``(path, windows)``."""
    from safetensors.torch import load_file, save_file
    from tensorpress.calib.data import calibration_samples, eval_windows as _eval_windows
    data = Path(work) / "tokens.safetensors"
    windows = _eval_windows(tok, eval_windows, 512).contiguous()
    calib = calibration_samples(tok, samples, seq_len).contiguous()
    if data.exists():
        try:
            old = load_file(data)
            if old.keys() == {"calib", "eval"} and old["calib"].equal(calib) and old["eval"].equal(windows):
                return data, windows
        except Exception:  # noqa: BLE001 — unreadable: rewritten below
            pass
    tmp = data.with_name(data.name + ".tmp")
    save_file({"calib": calib, "eval": windows}, tmp)
    os.replace(tmp, data)
    return data, windows


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or platform.platform()})"


def fmt(v, f: str) -> str:
    return "-" if v is None else f.format(v)


def worker_env(root: Path, threads: int, **extra) -> dict:
    """Environment of one row's process: offline hubs, the thread count, tensorpress importable.
    OpenMP threads sleep when idle (``OMP_WAIT_POLICY=PASSIVE``, unless set): spinning threads made
    small decompositions and GPTQ 20-100x slower whenever the cores were shared (measured on 2 cores;
    results are unchanged), so rows measured beside any other work were not comparable."""
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TP_ROOT": str(root), "OMP_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_worker(name: str, cmd: list[str], env: dict, work: Path, timeout: float | None = None) -> dict:
    """Run one row's process in ``work`` (peers write logs into cwd) and return the JSON of its last
    ``RESULT `` line, with ``process_seconds``; a failed row stops the benchmark with its stderr tail."""
    import json
    import subprocess
    import time
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"row {name} failed:\n{r.stderr[-3000:]}")
    res = json.loads(lines[-1][7:])
    res["process_seconds"] = round(time.perf_counter() - t0, 1)
    return res


# Options whose values are machine-local (scratch directories, interpreters, free-text notes): a recorded
# command line shows a placeholder instead.
LOCAL_ARGS = {"--work": "DIR", "--out": "DIR", "--peers-python": "PYTHON", "--note": "…"}
DIR_ARGS = {"--work": "DIR", "--out": "DIR"}          # benchmarks whose notes are recorded in full


def public_args(argv: list[str], hide: dict[str, str] = LOCAL_ARGS) -> list[str]:
    """The command line as recorded in a report: the values of ``hide``'s options (``--opt VALUE`` or
    ``--opt=VALUE``) replaced by their placeholders, so no local path reaches a committed result."""
    out = []
    for i, x in enumerate(argv):
        key = x.split("=")[0]
        if i and argv[i - 1] in hide:
            out.append(hide[argv[i - 1]])
        elif key in hide and "=" in x:
            out.append(f"{key}={hide[key]}")
        else:
            out.append(x)
    return out


def write_row(path: Path, res: dict) -> None:
    """One row's JSON, written to a temporary file and renamed: an interrupted run never leaves a
    truncated row that ``--reuse`` would keep."""
    import json
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


def stored_row(results: Path, name: str, dirs, key: str = "copied_from") -> dict | None:
    """Row ``name`` as another benchmark stored it (the first of ``results/<dir>/<name>.json`` over
    ``dirs``), tagged with its origin under ``key`` (``copied_from`` / ``adopted_from``); None when absent."""
    import json
    for d in dirs:
        src = Path(results) / d / f"{name}.json"
        if src.exists():
            return {**json.loads(src.read_text()), key: f"benchmarks/results/{d}/{src.name}"}
    return None


def run_rows(names, rows_dir: Path, run, *, reuse: bool = False, stored=None, finish=None, keep=None,
             summary=("ppl", "compress_seconds")) -> None:
    """The benchmarks' row loop: each row of ``names`` in turn, stored as ``rows_dir/<name>.json``.

    ``run(name) -> dict`` produces a row (its own process; the date is added here). ``reuse`` keeps a
    row already stored (``keep(name, path) -> bool`` refines that, e.g. a row whose checkpoint must
    also still exist). ``stored(name) -> dict | None`` returns a row another benchmark already ran
    on the same protocol, copied instead of re-running (it names its origin in ``copied_from`` or
    ``adopted_from``). ``finish(name, res) -> dict`` is applied last, before the row is written.
    Progress (and the ``summary`` keys of each row) goes to stderr."""
    import json
    import sys
    import time
    for name in names:
        f = Path(rows_dir) / f"{name}.json"
        if reuse and f.exists() and (keep is None or keep(name, f)):
            continue
        res = stored(name) if stored is not None else None
        if res is None:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            res = run(name)
            res["date"] = time.strftime("%Y-%m-%d %H:%M")
        if finish is not None:
            res = finish(name, res)
        write_row(f, res)
        origin = res.get("copied_from") or res.get("adopted_from")
        print(f"  {name}: {json.dumps({k: res.get(k) for k in summary})}" + (f"  (from {origin})" if origin else ""),
              file=sys.stderr, flush=True)
