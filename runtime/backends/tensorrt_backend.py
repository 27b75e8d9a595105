"""TensorRT: load the plans `dllm-trt build` made (export/tensorrt_build.py) and run them, in either flavour:
TensorRT proper (`tensorrt`, 10.x/11.x: plans built on and for one GPU) or TensorRT for RTX (`tensorrt_rtx`, 1.x:
plans compiled ahead of time without a GPU for compute-capability targets, finished just in time on the user's GPU).
Both share the API used here (named I/O tensors, execute_async_v3); their differences are the few lines marked
"flavour:". Device memory comes from torch CUDA tensors so caches sit at fixed addresses; only the small statistics
and the head's tokens/probabilities are copied to (pinned) host memory. Importing a flavour and its logger are here
too, and shared with the builder.

Everything that needs no TensorRT (flavour choice, GPU support, fingerprints, plan cache decisions) is in
runtime/trt_plans.py.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

from ..manifest import load_manifest, range_name
from ..trt_plans import (FLAVOR_NAMES, FLAVORS, PlanError, StalePlan, choose_flavor, find_built, gpu_support,
                         plan_dir, read_plan, read_record, replace_file)
from .base import Backend, BackendError, RangeStats, split_stats, stat_tensors

RUNTIME_CACHE = "runtime.cache"  # RTX: kernels compiled just in time, kept next to the plans for the next start


def installed_flavors() -> list[str]:
    return [f for f, module in FLAVORS.items() if importlib.util.find_spec(module) is not None]


def cuda_device():
    """(torch, name, "major.minor") of the current CUDA GPU, or (torch or None, None, None) without one."""
    try:
        import torch
    except ImportError:
        return None, None, None
    if not torch.cuda.is_available():
        return torch, None, None
    major, minor = torch.cuda.get_device_capability()
    return torch, torch.cuda.get_device_name(), f"{major}.{minor}"


def import_tensorrt(flavor: str = "auto", device_cc: str | None = None):
    """(module, flavour name) of the chosen TensorRT flavour, or one-line BackendError."""
    try:
        flavor = choose_flavor(flavor, installed_flavors(), device_cc)
    except ValueError as e:
        raise BackendError(str(e)) from None
    try:
        trt = importlib.import_module(FLAVORS[flavor])
    except Exception as e:  # a broken install raises arbitrary errors on import
        raise BackendError(f"{FLAVOR_NAMES[flavor]} does not import: {str(e).splitlines()[0]}") from None
    return trt, flavor


def make_logger(trt):
    """A WARNING-level logger without the parser's 'Make sure input X has Int64 binding' notes: the runtime binds
    int64 tensors for every int64 input, so they only bury real warnings."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING and "has Int64 binding" not in msg:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return Logger()


def load_plan(trt, runtime, path: Path, flavor: str, sha256: str | None, size: int | None = None):
    """Deserialize one plan, or a one-line BackendError saying why not. The bytes are checked by read_plan, as
    `build` checks them: the hash catches a plan swapped for another piece's of the same size (same-shaped layer
    ranges give equal sizes), which sizes alone cannot."""
    try:
        blob = read_plan(path, size, sha256)
    except StalePlan as e:
        raise BackendError(f"{e}; rebuild it with dllm-trt build") from None
    except PlanError as e:
        raise BackendError(str(e)) from None
    if flavor == "rtx":  # flavour: RTX says why a plan cannot run here from its header alone
        validity, diagnostics = runtime.get_engine_validity(blob)
        if validity == trt.EngineValidity.INVALID:
            raise BackendError(f"{path}: TensorRT for RTX cannot run this plan here ({diagnostics}); "
                               "rebuild it with dllm-trt build")
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise BackendError(f"{path}: {FLAVOR_NAMES[flavor]} refused to load the plan; rebuild it with dllm-trt build")
    return engine


def save_runtime_cache(cache, path: Path) -> None:
    """Replace (never write through) the RTX runtime cache next to the plans; at exit, so failing is not fatal."""
    try:
        replace_file(path, bytes(cache.serialize()))
    except OSError as e:
        print(f"warning: {path} not saved ({e.strerror})", file=sys.stderr)


class TensorRTBackend(Backend):
    """Step structure (docs/CONTRACT.md, "Step order"): every window engine is enqueued back to back on one
    stream, the statistics stay on the device until `fetch` copies all of them to pinned host memory and waits
    on one event, then refresh engines run from the first drifting range."""

    name = "tensorrt"
    one_sync_per_step = True

    def __init__(self, engine_dir, precision: str | None = None, flavor: str = "auto"):
        torch, gpu_name, device_cc = cuda_device()
        trt, flavor = import_tensorrt(flavor, device_cc)
        if torch is None:
            raise BackendError("the TensorRT backend uses PyTorch for CUDA memory: pip install torch")
        if device_cc is None:
            raise BackendError(f"{FLAVOR_NAMES[flavor]} runs plans on an NVIDIA GPU, and CUDA reports none")
        supported, advice = gpu_support(flavor, device_cc)
        if not supported:
            raise BackendError(advice)
        self.trt, self.torch, self.flavor = trt, torch, flavor
        manifest = load_manifest(engine_dir)
        self.manifest, self.config, self.calibration = manifest, manifest.config, manifest.calibration
        self.ranges = [tuple(r) for r in manifest.layer_ranges]
        precision = precision or manifest.dtype
        try:  # refuses symlinks under trt/ before anything there is read
            target = find_built(engine_dir, manifest, gpu_name, device_cc, trt.__version__, precision, flavor)
        except PlanError as e:
            raise BackendError(str(e)) from None
        if target is None:
            raise BackendError(f"no up-to-date {FLAVOR_NAMES[flavor]} {trt.__version__} plans for this GPU "
                               f"(sm{device_cc.replace('.', '')}) and {precision}: run dllm-trt build {engine_dir}")
        self.logger = make_logger(trt)  # kept: the bindings do not keep a Python logger (or the runtime) alive
        runtime = self.runtime = trt.Runtime(self.logger)
        d = plan_dir(engine_dir, target)
        self.engines, self.contexts = {}, {}
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.runtime_cache, self.runtime_configs = None, []
        record = read_record(engine_dir, target)
        hashes, sizes = record.get("plan_sha256", {}), record.get("plan_size", {})
        for p in manifest.pieces:
            engine = load_plan(trt, runtime, d / f"{p.name}.plan", flavor, hashes.get(p.name), sizes.get(p.name))
            self.engines[p.name] = engine
            if flavor == "rtx":  # flavour: a runtime config per context, one runtime (JIT) cache shared by all
                self.contexts[p.name] = engine.create_execution_context(
                    self._runtime_config(engine, d / RUNTIME_CACHE, strategy))
            else:
                self.contexts[p.name] = engine.create_execution_context(strategy)
        self.act = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[manifest.dtype]
        self.device = torch.device("cuda")
        self.stream = torch.cuda.current_stream()  # torch's copies and TensorRT's kernels share one stream, in order
        scratch = max(e.device_memory_size_v2 for e in self.engines.values())
        self.scratch = torch.empty(scratch, dtype=torch.uint8, device=self.device)  # shared: pieces run in turn
        self._stat_host, self._stat_event = None, torch.cuda.Event()

    def _runtime_config(self, engine, cache_path: Path, strategy):
        """An RTX runtime config for one context; the first call opens the shared runtime cache, loaded from
        cache_path and saved back there at exit. Configs and cache are kept: they must outlive the contexts."""
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        if self.runtime_cache is None:
            self.torch.zeros(1, device="cuda")  # deserializing checks the environment against a current CUDA context
            cache = self.runtime_cache = config.create_runtime_cache()
            if cache_path.is_file():
                cache.deserialize(cache_path.read_bytes())  # rejected (and ignored) when made on another GPU/driver
            atexit.register(save_runtime_cache, cache, cache_path)
        config.set_runtime_cache(self.runtime_cache)
        self.runtime_configs.append(config)
        return config

    def describe(self) -> str:
        name = "tensorrt-rtx" if self.flavor == "rtx" else "tensorrt"
        return f"{name} ({self.torch.cuda.get_device_name()}, {self.manifest.dtype})"

    def _run(self, piece: str, inputs: dict, outputs: dict) -> None:
        """Bind device tensors by name and enqueue one piece on the backend's stream."""
        ctx = self.contexts[piece]
        for name, t in inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        try:  # setDeviceMemoryV2 (pointer + size) in the 10.x/11.x bindings
            ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        except (AttributeError, TypeError):  # bindings that only expose the pointer property
            ctx.device_memory = self.scratch.data_ptr()
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {piece}")

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)

    def _empty(self, *shape, dtype=None):
        return self.torch.empty(shape, dtype=dtype or self.act, device=self.device)

    def _host(self, tensors: list):
        """Copy small device tensors to pinned host memory and wait for the stream."""
        host = [self.torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        self.stream.synchronize()
        return [h.float().numpy() if h.is_floating_point() else h.numpy() for h in host]

    def _allocate(self, n: int) -> None:
        c = self.config
        self.k = [self._empty(c.n_heads, n, c.head_dim) for _ in range(c.n_layers)]
        self.v = [self._empty(c.n_heads, n, c.head_dim) for _ in range(c.n_layers)]
        self.q = [self._empty(c.n_heads, n, c.head_dim) for _ in range(c.n_layers)]
        self.boundary = [self._empty(n, c.d_model) for _ in range(len(self.ranges) + 1)]
        self.positions = self._t(np.arange(n, dtype=np.int64))

    def _embed(self, ids, positions):
        ids_t = self._t(ids)
        out = self.boundary[0] if positions is None else self._empty(len(ids), self.config.d_model)
        self._run("embed", {"input_ids": ids_t}, {"hidden_states": out})
        if positions is not None:
            self.boundary[0].index_copy_(0, self._t(positions), out)
        self.current = out

    def _window(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        a, b = self.ranges[r]
        c, n_act = self.config, len(positions)
        pos, track = self._t(positions), self._t(track_positions)
        inputs = {"hidden_states": self.current, "position_ids": pos, "track_rows": self._t(track_rows),
                  "window_rows": self._t(window_rows), "key_is_mask": self._t(key_is_mask)}
        outputs = {"hidden_states_out": self._empty(n_act, c.d_model)}
        for L in range(a, b):
            inputs |= {f"past_key_values.{L}.key": self.k[L], f"past_key_values.{L}.value": self.v[L],
                       f"track_queries.{L}": self.q[L].index_select(1, track).contiguous()}
            outputs |= {f"new_key_values.{L}.key": self._empty(c.n_heads, n_act, c.head_dim),
                        f"new_key_values.{L}.value": self._empty(c.n_heads, n_act, c.head_dim),
                        f"new_queries.{L}": self._empty(c.n_heads, n_act, c.head_dim),
                        f"drift.{L}": self._empty(2, dtype=self.torch.float32),
                        f"attn_colsum.{L}": self._empty(self.n_positions, dtype=self.torch.float32)}
        self._run(f"{range_name(a, b)}.window", inputs, outputs)
        for L in range(a, b):  # write the new rows into the caches, on device
            self.k[L].index_copy_(1, pos, outputs[f"new_key_values.{L}.key"])
            self.v[L].index_copy_(1, pos, outputs[f"new_key_values.{L}.value"])
            self.q[L].index_copy_(1, pos, outputs[f"new_queries.{L}"])
        self.boundary[r + 1].index_copy_(0, pos, outputs["hidden_states_out"])
        self.current = outputs["hidden_states_out"]
        return RangeStats(colsum=self.torch.stack([outputs[f"attn_colsum.{L}"] for L in range(a, b)]),
                          drift=self.torch.stack([outputs[f"drift.{L}"] for L in range(a, b)]))

    def _refresh(self, r, window_positions, key_is_mask):
        a, b = self.ranges[r]
        outputs = {"hidden_states_out": self.boundary[r + 1]}
        for L in range(a, b):
            outputs |= {f"key_values.{L}.key": self.k[L], f"key_values.{L}.value": self.v[L],
                        f"queries.{L}": self.q[L],
                        f"attn_colsum.{L}": self._empty(self.n_positions, dtype=self.torch.float32)}
        self._run(f"{range_name(a, b)}.refresh",
                  {"hidden_states": self.boundary[r], "position_ids": self.positions,
                   "window_positions": self._t(window_positions), "key_is_mask": self._t(key_is_mask)}, outputs)
        self.current = self.boundary[r + 1]
        return RangeStats(colsum=self.torch.stack([outputs[f"attn_colsum.{L}"] for L in range(a, b)]))

    def fetch(self, stats):
        """All statistics of a step (device tensors) in one copy to pinned host memory and one event wait."""
        parts = stat_tensors(stats)
        if not parts:
            return stats
        flat = self.torch.cat([t.reshape(-1).float() for t in parts])
        if self._stat_host is None or self._stat_host.numel() < flat.numel():
            self._stat_host = self.torch.empty(flat.numel(), dtype=self.torch.float32, pin_memory=True)
        host = self._stat_host[: flat.numel()]
        host.copy_(flat, non_blocking=True)
        self._stat_event.record(self.stream)
        self._stat_event.synchronize()
        return split_stats(stats, host.numpy().copy())

    def _head(self, rows):
        n = len(rows)
        tokens = self._empty(n, dtype=self.torch.int64)
        probs = self._empty(n, dtype=self.torch.float32)
        self._run("head", {"hidden_states": self.current, "rows": self._t(rows)}, {"tokens": tokens, "probs": probs})
        return tuple(self._host([tokens, probs]))
