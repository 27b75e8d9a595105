"""`dllm-trt doctor`: what this machine offers and which backends are usable, in a few lines."""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import socket
import tempfile
from pathlib import Path

from .trt_plans import FLAVOR_NAMES, FLAVORS, gpu_support, install_hint


def _version(pkg: str) -> str | None:
    if importlib.util.find_spec(pkg) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def _import_version(module: str) -> str | None:
    """The module's version; None when not installed; 'broken (...)' when it does not import."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.import_module(module).__version__
    except Exception as e:  # a broken install raises arbitrary errors on import
        return f"broken ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def flavors_line(versions: dict[str, str | None]) -> str:
    return "; ".join(f"{FLAVORS[f]}: {v or 'not installed'}" for f, v in versions.items())


def tensorrt_usable(versions: dict[str, str | None], device_cc: str | None, why_no_gpu: str) -> str:
    """Whether the installed TensorRT flavour(s) can build and run plans on this machine, and what to install
    instead when not (pure: versions per flavour, this GPU's compute capability or None)."""
    installed = {f: v for f, v in versions.items() if v}
    if not installed:
        return ("tensorrt: no (not installed; it comes from NVIDIA's pip packages: pip install tensorrt for "
                "data-centre GPUs and Jetson, pip install tensorrt-rtx for RTX GPUs)")
    parts = []
    for flavor, version in installed.items():
        name = f"{FLAVOR_NAMES[flavor]} {version}"
        if version.startswith("broken"):
            parts.append(f"no ({FLAVOR_NAMES[flavor]} is {version}: reinstall it with {install_hint(flavor)})")
        elif device_cc is None and flavor == "rtx":
            parts.append(f"build only ({name} builds plans without a GPU: dllm-trt build; "
                         f"running them needs an RTX GPU, and {why_no_gpu})")
        elif device_cc is None:
            parts.append(f"no ({name} needs a GPU to build and run plans, and {why_no_gpu})")
        else:
            ok, advice = gpu_support(flavor, device_cc)
            parts.append(f"yes ({name} supports sm{device_cc.replace('.', '')}; build plans with dllm-trt build)"
                         if ok else f"no ({name}: {advice})")
    return "tensorrt: " + " / ".join(parts)


def ray_cluster_address() -> str | None:
    """The Ray cluster `ray.init(address="auto")` would join: $RAY_ADDRESS, else the one `ray start` last started on
    this node (Ray records its address in <temp>/ray/ray_current_cluster)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        return (Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def reachable(address: str, timeout: float = 2.0) -> str | None:
    """None when a TCP connection to the address's host:port opens, else why not."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return "not a host:port address"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return None
    except OSError as e:
        return e.strerror or type(e).__name__


def ray_line(version: str | None, address: str | None, why_not: str | None = None) -> str:
    """What doctor says about Ray Serve (pure: Ray's version, the cluster address found, why it is not reachable)."""
    if version is None:
        return "ray: not installed (serve --ray needs it: pip install 'dllm-trt[ray]')"
    if address is None:
        return (f"ray: {version}; no Ray cluster found on this node (serve --ray starts a Ray instance of its own; "
                f"ray start --head starts a lasting one, joined with serve --ray --ray-address auto)")
    if why_not is None:
        return f"ray: {version}; cluster at {address} reachable (serve --ray --ray-address auto joins it)"
    return f"ray: {version}; cluster at {address} not reachable ({why_not}; is it stopped? ray start --head)"


def report() -> list[str]:
    lines = [f"python {platform.python_version()} on {platform.machine()}"]
    gpu, device_cc, why_no_gpu = None, None, ""
    torch_v = _version("torch")
    if torch_v is None:
        why_no_gpu = "PyTorch not installed"
    else:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            device_cc = f"{major}.{minor}"
            gpu = f"{torch.cuda.get_device_name()} (sm{major}{minor}), CUDA {torch.version.cuda}"
        else:
            why_no_gpu = "CUDA reports no GPU"
    lines.append(f"gpu: {gpu or 'none (' + why_no_gpu + ')'}")
    trt_versions = {f: _import_version(module) for f, module in FLAVORS.items()}
    ort_v = _version("onnxruntime") or _version("onnxruntime-gpu")
    providers = []
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        ort_v = onnxruntime.__version__
        providers = onnxruntime.get_available_providers()
    lines.append(f"torch: {torch_v or 'not installed'}; onnxruntime: {ort_v or 'not installed'}"
                 f"{' (' + ', '.join(p.removesuffix('ExecutionProvider') for p in providers) + ')' if providers else ''}"
                 f"; {flavors_line(trt_versions)}")
    usable = []
    if ort_v:
        usable.append("onnxruntime: yes" + (" (CUDA EP)" if "CUDAExecutionProvider" in providers else " (CPU)"))
    else:
        usable.append("onnxruntime: no (pip install onnxruntime)")
    usable.append(f"torch: {'yes (' + ('cuda' if gpu else 'cpu') + ')' if torch_v else 'no (pip install torch)'}")
    usable.append(tensorrt_usable(trt_versions, device_cc, why_no_gpu))
    lines.append("backends: " + "; ".join(usable))
    ray_v, address = _version("ray"), ray_cluster_address()
    lines.append(ray_line(ray_v, address, reachable(address) if ray_v and address else None))
    return lines


def gamma_line(engines, calibration: dict) -> str:
    """Where an engine folder's default gamma comes from."""
    from .options import DEFAULT_GAMMA

    if not calibration:
        return (f"gamma for {engines}: {DEFAULT_GAMMA} (default: not calibrated; dllm-trt calibrate {engines} "
                f"--data FILE.jsonl)")
    gammas = ", ".join(f"{m} {g:g}" for m, g in calibration["gamma"].items())
    return (f"gamma for {engines}: {gammas} (calibrated: {calibration['objective']}, target "
            f"{calibration['target']:g}, {calibration['prompts']} prompts, {calibration['date']}; --gamma overrides)")
