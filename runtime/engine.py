"""Open a backend: exported engines (manifest.json) run on ONNX Runtime; checkpoints run on the torch backend."""
from __future__ import annotations

from pathlib import Path

from .backends.base import Backend, BackendError
from .config import ModelError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (choose {', '.join(BACKENDS)})")


def open_engines(engines: str | Path, backend: str = "auto", threads: int | None = None) -> Backend:
    check_backend_name(backend)
    if backend == "torch":
        raise BackendError("the torch backend runs checkpoints: use --model DIR (or --backend onnxruntime)")
    if backend == "tensorrt" or (backend == "auto" and _may_have_plans(engines)):
        from .backends.tensorrt_backend import TensorRTBackend

        try:
            return TensorRTBackend(engines)
        except BackendError:
            if backend == "tensorrt":
                raise  # auto falls back to ONNX Runtime; it never builds plans by itself
    from .backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(engines, threads=threads)


def _may_have_plans(engines) -> bool:
    if not (Path(engines) / "trt").is_dir():
        return False  # the common case, answered without importing the TensorRT bookkeeping
    import importlib.util

    from .trt_plans import FLAVORS

    return any(importlib.util.find_spec(module) is not None for module in FLAVORS.values())


def open_checkpoint(model: str | Path, layers_per_range: int = 1, device: str | None = None,
                    dtype: str = "fp32", graphs: bool = False) -> Backend:
    """The torch backend on a checkpoint; graphs=True: fixed-shape (bucketed) steps replayed as CUDA graphs on a
    GPU (the same padded programs run eagerly on a CPU)."""
    from .backends.torch_backend import PaddedTorchBackend, TorchBackend

    try:
        if graphs:
            return PaddedTorchBackend(model, layers_per_range, device, dtype, graphs=True)
        return TorchBackend(model, layers_per_range, device, dtype)
    except ValueError as e:
        raise ModelError(str(e)) from None


def export_cache_dir(model: str | Path, cache_root: str | Path, **settings) -> Path:
    """Where an automatic export of `model` with these settings lives: <cache_root>/<name>-<key>, the key
    covering the checkpoint fingerprint and the settings (so a changed checkpoint exports anew)."""
    import hashlib
    import json

    from .checkpoint import Checkpoint

    from .manifest import FORMAT_VERSION

    # the manifest format is part of the key: a runtime reading a newer format exports anew, next to the old folder
    key_src = json.dumps({"checkpoint": Checkpoint(model).fingerprint(), "format_version": FORMAT_VERSION,
                          **settings}, sort_keys=True)
    return Path(cache_root) / f"{Path(model).resolve().name}-{hashlib.sha256(key_src.encode()).hexdigest()[:12]}"

