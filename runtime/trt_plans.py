"""TensorRT plan bookkeeping that needs no TensorRT: optimization profiles from the manifest, the per-GPU
fingerprint, and whether existing plans can be used, must be rebuilt, or must be refused.

Plans live in <engines>/trt/<fingerprint>/: one <piece>.plan per ONNX piece, plus build.json recording the
fingerprint's inputs and the sha256 of each source ONNX file. "Built once per GPU": the same GPU, TensorRT version,
precision and profiles give the same folder, and a complete folder whose sources still match is reused as is.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .manifest import Manifest, PieceSpec

BUILD_RECORD = "build.json"
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Target:
    """What a plan is specific to."""

    gpu_name: str
    compute_capability: str       # "9.0"
    trt_version: str
    precision: str
    max_len: int
    max_active: int
    opt_level: int = 3

    def fingerprint(self) -> str:
        key = json.dumps(asdict(self), sort_keys=True)
        cc = self.compute_capability.replace(".", "")
        return f"sm{cc}-trt{self.trt_version}-{self.precision}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def check_precision(manifest: Manifest, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if manifest.dtype != precision:
        # TensorRT 11 networks are strongly typed: the precision is whatever the ONNX graphs carry
        raise ValueError(f"the engines were exported as {manifest.dtype}; TensorRT builds strongly typed networks, "
                         f"so --precision {precision} needs an export with --dtype {precision}")


def dim_ranges(manifest: Manifest, max_len: int | None = None, max_active: int | None = None) -> dict:
    """(min, opt, max) per symbolic dimension, clipped to the requested maxima. One entry per dim name, so every
    input that shares a dim gets identical ranges (TensorRT rejects profiles that disagree on a tied dim)."""
    out = {}
    for name, r in manifest.dims.items():
        lo, hi = r["min"], r["max"]
        cap = max_len if name in ("seq_len", "n_tokens", "n_hidden") else max_active
        if cap is not None:
            if cap < lo or cap > hi:
                raise ValueError(f"--max-{'len' if cap is max_len else 'active'} {cap} is outside the exported "
                                 f"range {lo}..{hi} of {name}")
            hi = cap
        opt = min(hi, max(lo, 512 if name in ("seq_len", "n_tokens", "n_hidden") else 32))
        out[name] = (lo, opt, hi)
    return out


def profile_for(piece: PieceSpec, ranges: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """input name -> (min shape, opt shape, max shape) for one optimization profile."""
    profile = {}
    for t in piece.inputs:
        shapes = tuple(tuple(ranges[d][i] if isinstance(d, str) else d for d in t.shape) for i in range(3))
        profile[t.name] = shapes
    return profile


def plan_dir(engine_dir: str | Path, target: Target) -> Path:
    return Path(engine_dir) / "trt" / target.fingerprint()


def plan_status(engine_dir: str | Path, manifest: Manifest, target: Target) -> tuple[str, str]:
    """('ok', '') when every plan exists and was built from the current ONNX files for this target;
    ('build', why) when plans must be (re)built; a foreign or damaged record is never trusted."""
    d = plan_dir(engine_dir, target)
    record_path = d / BUILD_RECORD
    if not record_path.is_file():
        return "build", "no plans for this GPU / TensorRT / precision yet"
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return "build", f"{record_path} is unreadable"
    if record.get("target") != asdict(target):
        return "build", f"{record_path} was written for another target"
    for p in manifest.pieces:
        if record.get("onnx_sha256", {}).get(p.name) != p.sha256:
            return "build", f"{p.file} changed since its plan was built"
        plan = d / f"{p.name}.plan"
        if not plan.is_file() or plan.stat().st_size != record.get("plan_size", {}).get(p.name):
            return "build", f"{plan} is missing or incomplete"
    return "ok", ""


def find_built(engine_dir: str | Path, manifest: Manifest, gpu_name: str, compute_capability: str,
               trt_version: str, precision: str) -> Target | None:
    """The target of complete, up-to-date plans built on this GPU / TensorRT / precision (whatever --max-len,
    --max-active and --opt-level they were built with), or None."""
    for record_path in sorted((Path(engine_dir) / "trt").glob(f"*/{BUILD_RECORD}")):
        try:
            target = Target(**json.loads(record_path.read_text())["target"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if (target.gpu_name, target.compute_capability, target.trt_version, target.precision) != (
                gpu_name, compute_capability, trt_version, precision):
            continue
        if plan_status(engine_dir, manifest, target)[0] == "ok":
            return target
    return None


def write_record(engine_dir: str | Path, manifest: Manifest, target: Target) -> None:
    d = plan_dir(engine_dir, target)
    record = {
        "target": asdict(target), "fingerprint": target.fingerprint(),
        "onnx_sha256": {p.name: p.sha256 for p in manifest.pieces},
        "plan_size": {p.name: (d / f"{p.name}.plan").stat().st_size for p in manifest.pieces},
    }
    (d / BUILD_RECORD).write_text(json.dumps(record, indent=2))


def cache_bytes(manifest: Manifest, seq_len: int, dtype_bytes: int) -> dict[str, int]:
    """Device memory the runtime keeps for a canvas of seq_len slots: K/V/Q per layer and one hidden-state
    boundary per layer range (plus one for the last output)."""
    c = manifest.config
    kvq = 3 * c.n_layers * c.n_heads * seq_len * c.head_dim * dtype_bytes
    hidden = (len(manifest.layer_ranges) + 1) * seq_len * c.d_model * dtype_bytes
    return {"kvq": kvq, "hidden": hidden, "total": kvq + hidden}
