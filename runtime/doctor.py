"""`dllm-trt doctor`: what this machine offers and which backends are usable, in a few lines."""
from __future__ import annotations

import importlib.util
import platform


def _version(pkg: str) -> str | None:
    if importlib.util.find_spec(pkg) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def report() -> list[str]:
    lines = [f"python {platform.python_version()} on {platform.machine()}"]
    gpu, why_no_gpu = None, ""
    torch_v = _version("torch")
    if torch_v is None:
        why_no_gpu = "PyTorch not installed"
    else:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            gpu = f"{torch.cuda.get_device_name()} (sm{major}{minor}), CUDA {torch.version.cuda}"
        else:
            why_no_gpu = "CUDA reports no GPU"
    lines.append(f"gpu: {gpu or 'none (' + why_no_gpu + ')'}")
    trt_v = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            trt_v = tensorrt.__version__
        except Exception as e:  # a broken install raises arbitrary errors on import
            trt_v, trt_err = None, f"import failed: {str(e).splitlines()[0]}"
    ort_v = _version("onnxruntime") or _version("onnxruntime-gpu")
    providers = []
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        ort_v = onnxruntime.__version__
        providers = onnxruntime.get_available_providers()
    lines.append(f"torch: {torch_v or 'not installed'}; onnxruntime: {ort_v or 'not installed'}"
                 f"{' (' + ', '.join(p.removesuffix('ExecutionProvider') for p in providers) + ')' if providers else ''}"
                 f"; tensorrt: {trt_v or 'not installed'}")
    usable = []
    if ort_v:
        usable.append("onnxruntime: yes" + (" (CUDA EP)" if "CUDAExecutionProvider" in providers else " (CPU)"))
    else:
        usable.append("onnxruntime: no (pip install onnxruntime)")
    usable.append(f"torch: {'yes (' + ('cuda' if gpu else 'cpu') + ')' if torch_v else 'no (pip install torch)'}")
    if trt_v and gpu:
        usable.append("tensorrt: yes (build plans with dllm-trt build)")
    elif trt_v:
        usable.append(f"tensorrt: no ({why_no_gpu})")
    else:
        usable.append("tensorrt: no (not installed; it comes from NVIDIA's pip packages: pip install tensorrt)")
    lines.append("backends: " + "; ".join(usable))
    return lines
