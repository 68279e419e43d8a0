"""Small helpers shared by the benchmarks (protocol token file, machine line, table cells)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def write_tokens(work: Path, tok, samples: int = 128, seq_len: int = 512, eval_windows: int = 40):
    """The protocol's calibration samples and evaluation windows, written once to
    ``work/tokens.safetensors`` (kept if already there) so that every row and every tool reads the
    same tokens. Returns ``(path, windows)``."""
    from safetensors.torch import save_file
    from tensorpress.calib.data import calibration_samples, eval_windows as _eval_windows
    data = Path(work) / "tokens.safetensors"
    windows = _eval_windows(tok, eval_windows, 512)
    if not data.exists():
        save_file({"calib": calibration_samples(tok, samples, seq_len).contiguous(),
                   "eval": windows.contiguous()}, data)
    return data, windows


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or platform.platform()})"


def fmt(v, f: str) -> str:
    return "-" if v is None else f.format(v)
