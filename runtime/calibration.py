"""The `calibration` block of manifest.json: the drift threshold `dllm-trt calibrate` measured for each drift
metric, which becomes the engine's default gamma (runtime/options.py resolve_gamma).

    "calibration": {"gamma": {"heads": 0.91, "keys": 0.95}, "score": {...}, "refresh_fraction": {...},
                    "objective": "agreement", "target": 0.99, "prompts": 64, "data_sha256": "...",
                    "tool_version": "0.1.0", "date": "2026-12-06T19:30:00+00:00"}

The block is checked strictly (check_calibration): a gamma that silently changes every decoding must not come from
a damaged or hand-edited file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path

from .options import GAMMA_RANGE

METRICS = ("heads", "keys")
OBJECTIVES = ("agreement", "accuracy")
PER_METRIC = ("gamma", "score", "refresh_fraction")
FIELDS = (*PER_METRIC, "objective", "target", "prompts", "data_sha256", "tool_version", "date")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_calibration(block, bad) -> dict:
    """The block itself when it is well formed; else raises bad(what) (the manifest's one-line error)."""
    if not isinstance(block, dict):
        raise bad("calibration must be an object")
    missing = [k for k in FIELDS if k not in block]
    unknown = sorted(set(block) - set(FIELDS))
    if missing or unknown:
        raise bad(f"calibration {'lacks ' + repr(missing[0]) if missing else 'has unknown field ' + repr(unknown[0])}")
    gammas = block["gamma"]
    if not isinstance(gammas, dict) or not gammas:
        raise bad("calibration.gamma must map drift metrics to gammas")
    for key in PER_METRIC:
        values = block[key]
        if not isinstance(values, dict) or set(values) != set(gammas):
            raise bad(f"calibration.{key} must have one value per drift metric of calibration.gamma")
        for metric, value in values.items():
            if metric not in METRICS:
                raise bad(f"calibration.{key} names unknown drift metric {metric!r} (known: {', '.join(METRICS)})")
            lo, hi = GAMMA_RANGE if key == "gamma" else (0.0, 1.0)
            if not _number(value) or not lo <= value <= hi:
                raise bad(f"calibration.{key}.{metric} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    if block["objective"] not in OBJECTIVES:
        raise bad(f"calibration.objective must be one of {', '.join(OBJECTIVES)}, got {block['objective']!r}")
    hi = 1.0 if block["objective"] == "agreement" else 100.0   # agreement: a fraction; accuracy: points
    if not _number(block["target"]) or not 0 <= block["target"] <= hi:
        raise bad(f"calibration.target must be a number in [0, {hi:g}] for {block['objective']}, "
                  f"got {block['target']!r}")
    prompts = block["prompts"]
    if not isinstance(prompts, int) or isinstance(prompts, bool) or prompts < 1:
        raise bad(f"calibration.prompts must be a positive integer, got {prompts!r}")
    if not (isinstance(block["data_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", block["data_sha256"])):
        raise bad("calibration.data_sha256 must be 64 lowercase hex digits")
    if not (isinstance(block["tool_version"], str) and 0 < len(block["tool_version"]) <= 64):
        raise bad("calibration.tool_version must be a short string")
    try:
        if not isinstance(block["date"], str) or len(block["date"]) > 40:
            raise ValueError
        datetime.fromisoformat(block["date"])
    except ValueError:
        raise bad(f"calibration.date must be an ISO 8601 date, got {str(block['date'])[:40]!r}") from None
    return block


def write_calibration(engine_dir: str | Path, block: dict) -> None:
    """Put `block` into engine_dir/manifest.json, replacing any earlier calibration and keeping every other field
    as it is. Atomic: a temporary sibling replaces the manifest in one rename, so a crash leaves the old one."""
    from .config import ModelError

    def bad(what):
        return ModelError(f"refusing to record a calibration: {what}")

    check_calibration(block, bad)
    path = Path(engine_dir) / "manifest.json"
    raw = json.loads(path.read_text())
    raw["calibration"] = block
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(raw, indent=2))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
