"""Open a backend for a checkpoint directory (--model) or an exported engine directory (--engines)."""
from __future__ import annotations

from pathlib import Path

from .backends.base import Backend, BackendError
from .config import ModelError


def load_backend(model: str | None = None, engines: str | None = None, backend: str = "auto",
                 layers_per_range: int = 1, device: str | None = None, dtype: str = "fp32") -> tuple[Backend, Path]:
    """Returns the backend and the directory holding the tokenizer files."""
    if backend not in ("auto", "torch", "onnxruntime"):
        raise BackendError(f"unknown backend {backend!r} (choose auto, torch or onnxruntime)")
    if engines is not None:
        raise BackendError("--engines needs the ONNX Runtime backend, which is not part of this build yet")
    if model is None:
        raise ModelError("give --model DIR or --engines DIR")
    if backend == "onnxruntime":
        raise BackendError("the ONNX Runtime backend runs exported engines: export first, then use --engines")
    from .backends.torch_backend import TorchBackend

    try:
        return TorchBackend(model, layers_per_range, device, dtype), Path(model)
    except ValueError as e:
        raise ModelError(str(e)) from None
