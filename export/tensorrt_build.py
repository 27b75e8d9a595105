"""TensorRT plans from the ONNX pieces: `dllm-trt build`, export-time work. Decides what to build for (the
precision, the dimension ranges and the optimization profiles: a window and a refresh profile for a layer range's
plan, one for embed and head; TensorRT for RTX's compute-capability targets), builds each stale piece with the
TensorRT builder of either flavour, and records the result in build.json.

Loading and running plans is runtime/backends/tensorrt_backend.py; the bookkeeping both sides share (flavours,
targets, fingerprints, plan-folder checks, stale_pieces) is runtime/trt_plans.py. Whether a plan folder is up to date
is decided there, by the same function the runtime uses, so "up to date" here means the runtime will load it.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from dllm_trt.runtime.backends.base import BackendError
from dllm_trt.runtime.backends.tensorrt_backend import cuda_device, import_tensorrt, make_logger
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import MODES, Manifest, PieceSpec, load_manifest
from dllm_trt.runtime.trt_plans import (BUILD_RECORD, FLAVOR_NAMES, ONE_PROFILE, RTX_CCS, RTX_DEFAULT, RTX_TURING,
                                        PlanError, Target, gpu_support, plan_dir, profile_modes, read_record,
                                        replace_file, stale_pieces)

PRECISIONS = ("bf16", "fp16", "fp32")


def rtx_targets(target_cc: str | None, device_cc: str | None) -> str:
    """The compute-capability targets of an RTX build, normalised: 'ampere+' (RTX's default portable set),
    'current' (this machine's GPU, which must exist), or a sorted comma list such as '7.5' or '8.6,8.9'.
    Without --target-cc: this GPU's compute capability if there is a supported one, else 'ampere+'."""
    if target_cc is None:
        return device_cc if device_cc in RTX_CCS else RTX_DEFAULT
    if target_cc == RTX_DEFAULT:
        return RTX_DEFAULT
    if target_cc == "current":
        if device_cc not in RTX_CCS:
            raise ValueError(f"--target-cc current needs a GPU TensorRT for RTX supports (this machine: "
                             f"{'no GPU' if device_cc is None else 'sm' + device_cc.replace('.', '')}); "
                             "name targets instead (e.g. --target-cc 8.6,8.9)")
        return device_cc
    ccs = {c.strip() for c in target_cc.split(",") if c.strip()}
    if RTX_TURING in ccs:
        raise ValueError(gpu_support("rtx", RTX_TURING)[1])
    if not ccs or not ccs <= set(RTX_CCS):
        raise ValueError(f"--target-cc {target_cc!r}: TensorRT for RTX builds for {', '.join(RTX_CCS)}, "
                         f"'{RTX_DEFAULT}' or 'current'")
    ccs = sorted(ccs, key=lambda c: tuple(map(int, c.split("."))))
    return ",".join(ccs)


def check_buildable(manifest: Manifest) -> None:
    """Weight-only quantized pieces use ONNX Runtime's own operators (com.microsoft MatMulNBits,
    GatherBlockQuantized), which TensorRT's ONNX parser does not know."""
    if manifest.quantization:
        raise ValueError(f"these engines hold {manifest.quantization['scheme']} weight-only pieces for ONNX Runtime "
                         f"(MatMulNBits), which TensorRT cannot build: export without --quantize for TensorRT")


def check_precision(manifest: Manifest, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if manifest.dtype != precision:
        # TensorRT 11 networks are strongly typed: the precision is whatever the ONNX graphs carry
        raise ValueError(f"the engines were exported as {manifest.dtype}; TensorRT builds strongly typed networks, "
                         f"so --precision {precision} needs an export with --dtype {precision}")


# Which --max-* limit caps a dimension: the canvas (--max-len) or the query rows of a window pass (--max-active).
# batch is not capped (its opt is its minimum: one sequence). `rows` is a whole canvas in refresh mode but a window
# pass's rows in window mode.
CAPS = {"seq_len": "len", "n_tokens": "len", "n_hidden": "len", "rows": "len",
        "track_len": "active", "window_len": "active", "n_rows": "active", "batch": "batch"}
MODE_CAPS = {"window": {"rows": "active"}}
OPT = {"len": 512, "active": 32}   # opt shapes: a typical canvas, a typical window pass


def dim_ranges(manifest: Manifest, max_len: int | None = None, max_active: int | None = None,
               mode: str = ONE_PROFILE, max_batch: int | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per dimension for the optimization profile of `mode`: manifest.dims, narrowed by
    manifest.profiles[mode] for a layer-range mode, clipped to the requested maxima. One entry per dim name, so every
    input that shares a dim gets identical ranges (TensorRT rejects profiles that disagree on a tied dim)."""
    spans = {name: (r["min"], r["max"]) for name, r in manifest.dims.items()}
    if mode != ONE_PROFILE:
        spans |= {name: (r["min"], r["max"]) for name, r in manifest.profiles[mode].items()}
    caps = {"len": max_len, "active": max_active, "batch": max_batch}
    out = {}
    for name, (lo, hi) in spans.items():
        kind = MODE_CAPS.get(mode, {}).get(name, CAPS.get(name))
        cap = caps.get(kind)
        if cap is not None:
            if cap < lo or cap > hi:
                raise ValueError(f"--max-{kind} {cap} is outside the exported range {lo}..{hi} of {name}"
                                 + (f" in {mode} mode" if mode != ONE_PROFILE else ""))
            hi = cap
        opt = min(hi, max(lo, OPT.get(kind, lo)))
        out[name] = (lo, opt, hi)
    return out


def profile_for(piece: PieceSpec, ranges: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """input name -> (min shape, opt shape, max shape) for one optimization profile."""
    profile = {}
    for t in piece.inputs:
        shapes = tuple(tuple(ranges[d][i] if isinstance(d, str) else d for d in t.shape) for i in range(3))
        profile[t.name] = shapes
    return profile


def piece_profiles(manifest: Manifest, piece: PieceSpec, max_len: int | None = None,
                   max_active: int | None = None, max_batch: int | None = None) -> dict[str, dict[str, tuple[int, int, int]]]:
    """mode -> (min, opt, max) of each dimension the piece's inputs use, one entry per optimization profile of its
    plan, in profile-index order (trt_plans.profile_modes)."""
    used = {d for t in piece.inputs for d in t.shape if isinstance(d, str)}
    return {mode: {name: r for name, r in dim_ranges(manifest, max_len, max_active, mode, max_batch).items()
                   if name in used}
            for mode in profile_modes(piece.kind)}


def write_record(engine_dir: str | Path, manifest: Manifest, target: Target,
                 build_seconds: dict[str, float] | None = None, plan_sha256: dict[str, str] | None = None,
                 profiles: dict[str, dict] | None = None) -> None:
    """Record the plans now in the target's folder. build_seconds, plan_sha256 and profiles (piece_profiles) are
    of the pieces just built; the other pieces' entries are kept from the previous record."""
    d = plan_dir(engine_dir, target)
    old = read_record(engine_dir, target)
    if old.get("target") != asdict(target):
        old = {}
    build_seconds = {**old.get("build_seconds", {}), **(build_seconds or {})}
    plan_sha256 = {**old.get("plan_sha256", {}), **(plan_sha256 or {})}
    profiles = {**old.get("profiles", {}), **(profiles or {})}
    names = [p.name for p in manifest.pieces]
    record = {
        "target": asdict(target), "fingerprint": target.fingerprint(),
        "onnx_sha256": {p.name: p.sha256 for p in manifest.pieces},
        "plan_size": {name: (d / f"{name}.plan").stat().st_size for name in names},
        "plan_sha256": {name: plan_sha256[name] for name in names if name in plan_sha256},
        "profiles": {name: profiles[name] for name in names if name in profiles},
        "build_seconds": build_seconds,
    }
    replace_file(d / BUILD_RECORD, json.dumps(record, indent=2).encode())


def build_target(trt, flavor: str, precision: str, ranges: dict, opt_level: int, target_cc: str | None,
                 gpu_name: str | None, device_cc: str | None) -> Target:
    common = dict(trt_version=trt.__version__, precision=precision, max_len=ranges["seq_len"][2],
                  max_active=ranges["window_len"][2], max_batch=ranges["batch"][2], opt_level=opt_level,
                  flavor=flavor)
    if flavor == "rtx":  # flavour: ahead-of-time builds for compute-capability targets, not for one GPU
        return Target(gpu_name="", compute_capability=rtx_targets(target_cc, device_cc), **common)
    if device_cc is None:
        raise BackendError("TensorRT builds plans on the GPU they are for, and CUDA reports none "
                           "(TensorRT for RTX builds without one: pip install tensorrt-rtx)")
    if target_cc not in (None, "current", device_cc):
        raise BackendError(f"TensorRT builds for this GPU (sm{device_cc.replace('.', '')}) only; "
                           "--target-cc is for TensorRT for RTX")
    return Target(gpu_name=gpu_name, compute_capability=device_cc, **common)


def configure(trt, flavor: str, config, target: Target, cache_path: Path):
    """Flavour-specific builder settings; returns the timing cache to save after each plan (or None)."""
    config.builder_optimization_level = target.opt_level
    if target.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; fp32 plans should compute like ONNX Runtime's
    if flavor == "rtx":
        # flavour: RTX has no precision flags either, takes explicit compute-capability targets, and a timing
        # cache would make it query the GPU (so GPU-less builds could not use one; RTX ignores it anyway).
        if target.compute_capability != RTX_DEFAULT:
            ccs = target.compute_capability.split(",")
            config.num_compute_capabilities = len(ccs)
            for i, cc in enumerate(ccs):
                config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i)
        return None
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(blob)
    config.set_timing_cache(timing_cache, False)
    return timing_cache


def network_flags(trt) -> int:
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if creation is not None and hasattr(creation, "STRONGLY_TYPED"):
        return 1 << int(creation.STRONGLY_TYPED)  # required on TensorRT 10.x; implied on 11.x and RTX
    return 0


def build_piece(trt, builder, logger, onnx_path: Path, profiles: list[dict], setup):
    """(plan bytes, what setup(config) returned) for one ONNX piece with its optimization profiles, in order
    (each input name -> (min, opt, max) shape)."""
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    for index, shapes in enumerate(profiles):  # the runtime selects profiles by index: they must land in order
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) != index:
            raise ModelError(f"TensorRT refused optimization profile {index} of {onnx_path.name} "
                             "(see the TensorRT log above)")
    extra = setup(config)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    return bytes(plan), extra


def build_plans(engine_dir, precision: str | None = None, max_len: int | None = None, max_active: int | None = None,
                opt_level: int = 3, progress: bool = True, flavor: str = "auto",
                target_cc: str | None = None, max_batch: int | None = None) -> Path:
    """Build every piece into <engine_dir>/trt/<fingerprint>/; a no-op when up-to-date plans exist.
    precision defaults to the export's dtype; target_cc (RTX only): 'ampere+', 'current' or e.g. '7.5,8.6'."""
    manifest = load_manifest(engine_dir)
    try:
        check_buildable(manifest)
    except ValueError as e:
        raise ModelError(str(e)) from None
    torch, gpu_name, device_cc = cuda_device()
    trt, flavor = import_tensorrt(flavor, device_cc)
    precision = precision or manifest.dtype
    try:
        check_precision(manifest, precision)
        ranges = dim_ranges(manifest, max_len, max_active, max_batch=max_batch)
        for mode in MODES:  # the mode profiles' own limits are checked before anything is built
            dim_ranges(manifest, max_len, max_active, mode, max_batch)
        target = build_target(trt, flavor, precision, ranges, opt_level, target_cc, gpu_name, device_cc)
    except ValueError as e:
        raise ModelError(str(e)) from None
    out = plan_dir(engine_dir, target)
    try:  # the runtime's own decision (plans hashed too), so "up to date" means the runtime will load them
        stale, why = stale_pieces(engine_dir, manifest, target)
    except PlanError as e:
        raise ModelError(str(e)) from None
    if not stale:
        print(f"plans in {out} are up to date", file=sys.stderr)
        return out
    print(f"building {len(stale)} of {len(manifest.pieces)} {FLAVOR_NAMES[flavor]} {trt.__version__} plans into "
          f"{out} ({why})", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    cache_path = out.parent / f"timing-{target.fingerprint()}.cache"
    from tqdm import tqdm

    seconds, hashes, profiles, start = {}, {}, {}, time.perf_counter()
    pieces = [p for p in manifest.pieces if p.name in stale]
    bar = tqdm(pieces, desc="build", unit="piece", disable=not progress, file=sys.stderr)
    for piece in bar:
        bar.set_postfix_str(piece.name)
        t0 = time.perf_counter()
        profiles[piece.name] = piece_profiles(manifest, piece, max_len, max_active, max_batch)
        plan, timing_cache = build_piece(trt, builder, logger, Path(engine_dir) / piece.file,
                                         [profile_for(piece, r) for r in profiles[piece.name].values()],
                                         lambda config: configure(trt, flavor, config, target, cache_path))
        replace_file(out / f"{piece.name}.plan", plan)  # an interrupted build leaves no torn plan
        if timing_cache is not None:
            replace_file(cache_path, bytes(timing_cache.serialize()))
        seconds[piece.name] = round(time.perf_counter() - t0, 3)
        hashes[piece.name] = hashlib.sha256(plan).hexdigest()
    write_record(engine_dir, manifest, target, seconds, hashes, profiles)
    total = sum((out / f"{p.name}.plan").stat().st_size for p in manifest.pieces)
    where = "targets " + target.compute_capability if flavor == "rtx" else target.gpu_name
    print(f"built {len(pieces)} plan{'s' if len(pieces) != 1 else ''} ({len(manifest.pieces)} in all, "
          f"{total / 2**20:.1f} MiB, {precision}, {where}) in {time.perf_counter() - start:.1f} s into {out}",
          file=sys.stderr)
    return out
