"""Recipes: ordered compression stages per module pattern, from YAML or a dict.

```yaml
name: gptq-w4g64+eora-r32
description: GPTQ 4-bit g64, then a rank-32 correction of the residual
calibration: {samples: 128, seq_len: 512}       # optional; defaults follow docs/protocol.md
stages:
  - method: gptq                                # a registered compressor
    targets: ".*"                               # regex(es) searched in full module names
    exclude: []                                 # regex(es) to skip
    bits: 4
    group_size: 64
  - method: eora
    rank: 32
```

Every target linear of the decoder blocks gets, in order, the stages whose ``targets`` match it.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .compress import Compressor, get_compressor
from .errors import TensorpressError

CALIBRATION_KEYS = {"samples": 128, "seq_len": 512, "batch_size": 8, "stats_source": "compressed", "seed": None}
TOP_KEYS = {"name", "description", "calibration", "stages"}
STAGE_KEYS = {"method", "targets", "exclude"}


def configs_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here.parent / "configs", Path(sys.prefix) / "share" / "tensorpress" / "configs"]


def available_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in configs_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found


@dataclass
class Stage:
    compressor: Compressor
    targets: list[str] = field(default_factory=lambda: [".*"])
    exclude: list[str] = field(default_factory=list)

    def matches(self, module_name: str) -> bool:
        return any(re.search(t, module_name) for t in self.targets) and not any(
            re.search(e, module_name) for e in self.exclude)

    def to_dict(self) -> dict:
        return {**self.compressor.to_dict(), "targets": self.targets, "exclude": self.exclude}


@dataclass
class Recipe:
    name: str
    stages: list[Stage]
    description: str = ""
    calibration: dict = field(default_factory=lambda: dict(CALIBRATION_KEYS))

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, name: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise TensorpressError(f"recipe {name}: expected a mapping at the top level")
        unknown = _names(set(d) - TOP_KEYS)
        if unknown:
            raise TensorpressError(f"recipe {name}: unknown key(s) {unknown}; valid: {', '.join(sorted(TOP_KEYS))}")
        calib = dict(CALIBRATION_KEYS)
        user_calib = d.get("calibration") or {}
        if not isinstance(user_calib, dict):
            raise TensorpressError(f"recipe {name}: 'calibration' must be a mapping")
        bad = _names(set(user_calib) - set(CALIBRATION_KEYS))
        if bad:
            raise TensorpressError(f"recipe {name}: unknown calibration key(s) {bad}; "
                                   f"valid: {', '.join(CALIBRATION_KEYS)}")
        calib.update(user_calib)
        _check_calibration(calib, name)
        raw_stages = d.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise TensorpressError(f"recipe {name}: 'stages' must be a non-empty list")
        stages = []
        for i, s in enumerate(raw_stages):
            if not isinstance(s, dict) or "method" not in s:
                raise TensorpressError(f"recipe {name}: stage {i + 1} must be a mapping with a 'method'")
            params = {k: v for k, v in s.items() if k not in STAGE_KEYS}
            odd = [k for k in params if not isinstance(k, str)]
            if odd:      # YAML allows any key type; ``**params`` needs strings
                raise TensorpressError(f"recipe {name}, stage {i + 1}: parameter names must be strings, got {odd[0]!r}")
            comp_cls = get_compressor(str(s["method"]))
            try:
                comp = comp_cls(**params)
            except TensorpressError as e:
                raise TensorpressError(f"recipe {name}, stage {i + 1}: {e}") from None
            targets, exclude = _patterns(s.get("targets", [".*"]), name), _patterns(s.get("exclude", []), name)
            stages.append(Stage(comp, targets, exclude))
        return cls(name=str(d.get("name", name)), stages=stages, description=str(d.get("description", "")),
                   calibration=calib)

    @classmethod
    def load(cls, spec: "str | Path | dict | Recipe") -> "Recipe":
        """A recipe from a shipped name (``gptq-w4g64``), a YAML path, a dict or a Recipe."""
        if isinstance(spec, Recipe):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if not isinstance(spec, (str, os.PathLike)) or "\0" in str(spec):
            raise TensorpressError(f"a recipe is a shipped name, a YAML path or a mapping, got {spec!r}")
        path = Path(spec)
        try:
            if not path.suffix and not path.exists():
                shipped = available_recipes()
                if str(spec) not in shipped:
                    raise TensorpressError(f"unknown recipe '{spec}'; shipped recipes: {', '.join(shipped)}")
                path = shipped[str(spec)]
            if not path.is_file():
                raise TensorpressError(f"recipe file {path} does not exist")
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:   # unreadable, not text, name too long, ...
            raise TensorpressError(f"cannot read recipe {spec}: {getattr(e, 'strerror', None) or e}") from None
        try:
            d = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as e:
            raise TensorpressError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0] if str(e) else e!r}") from None
        return cls.from_dict(d, name=path.stem)

    # --- use --------------------------------------------------------------------------------------
    def stages_for(self, module_name: str) -> list[Stage]:
        stages = [s for s in self.stages if s.matches(module_name)]
        seen_base = False
        for s in stages:
            if s.compressor.role == "correction" and not seen_base:
                raise TensorpressError(f"recipe {self.name}: correction stage '{s.compressor.name}' has no "
                                       f"compressed base before it for {module_name}")
            seen_base |= s.compressor.role == "base"
        return stages

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "calibration": self.calibration,
                "stages": [s.to_dict() for s in self.stages]}


def _names(keys) -> str:
    """Keys of any type (YAML allows ints, None, ...) listed in a stable order for a message."""
    return ", ".join(sorted(map(str, keys)))


def _patterns(v, name) -> list[str]:
    pats = [v] if isinstance(v, str) else v
    if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
        raise TensorpressError(f"recipe {name}: targets/exclude must be a regex or a list of regexes")
    for p in pats:
        try:
            re.compile(p)
        except (re.error, OverflowError, RecursionError) as e:   # "a{99999999999}" overflows
            raise TensorpressError(f"recipe {name}: bad regex {p!r}: {e}") from None
    return pats


def _check_calibration(c: dict, name: str) -> None:
    for k in ("samples", "seq_len", "batch_size"):
        if isinstance(c[k], bool) or not isinstance(c[k], int) or c[k] < 1:
            raise TensorpressError(f"recipe {name}: calibration.{k} must be a positive integer, got {c[k]!r}")
    if c["seq_len"] < 2:
        raise TensorpressError(f"recipe {name}: calibration.seq_len must be at least 2")
    if c["stats_source"] not in ("compressed", "dense"):
        raise TensorpressError(f"recipe {name}: calibration.stats_source must be 'compressed' or 'dense'")
    if c["seed"] is not None and (isinstance(c["seed"], bool) or not isinstance(c["seed"], int)):
        raise TensorpressError(f"recipe {name}: calibration.seed must be an integer or null")
