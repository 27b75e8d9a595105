"""TensorRT: build plans from the ONNX pieces (once per GPU) and run them. The only module that touches the
TensorRT API, written against the 10.x and 11.x Python documentation (strongly typed networks, named I/O tensors,
execute_async_v3). Device memory comes from torch CUDA tensors so caches sit at fixed addresses; only the small
statistics and the head's tokens/probabilities are copied to (pinned) host memory.

Everything that needs no TensorRT (profiles, fingerprints, plan cache decisions) is in runtime/trt_plans.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..config import ModelError
from ..manifest import load_manifest, range_name
from ..trt_plans import (Target, check_precision, dim_ranges, find_built, plan_dir, plan_status, profile_for,
                          write_record)
from .base import Backend, BackendError, RangeStats


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU); "
                           "use --backend onnxruntime or --backend torch") from None
    try:
        import torch
    except ImportError:
        raise BackendError("the TensorRT backend uses PyTorch for CUDA memory: pip install torch") from None
    if not torch.cuda.is_available():
        raise BackendError("TensorRT needs an NVIDIA GPU, and CUDA reports none")
    return trt, torch


def current_target(trt, torch, precision: str, max_len: int, max_active: int, opt_level: int) -> Target:
    major, minor = torch.cuda.get_device_capability()
    return Target(torch.cuda.get_device_name(), f"{major}.{minor}", trt.__version__, precision, max_len, max_active,
                  opt_level)


def build_plans(engine_dir, precision: str = "bf16", max_len: int | None = None, max_active: int | None = None,
                opt_level: int = 3, progress: bool = True) -> Path:
    """Build every piece into <engine_dir>/trt/<fingerprint>/; a no-op when up-to-date plans exist."""
    trt, torch = import_tensorrt()
    manifest = load_manifest(engine_dir)
    try:
        check_precision(manifest, precision)
        ranges = dim_ranges(manifest, max_len, max_active)
    except ValueError as e:
        raise ModelError(str(e)) from None
    target = current_target(trt, torch, precision, ranges["seq_len"][2], ranges["active_len"][2], opt_level)
    out = plan_dir(engine_dir, target)
    status, why = plan_status(engine_dir, manifest, target)
    if status == "ok":
        print(f"plans in {out} are up to date", file=sys.stderr)
        return out
    print(f"building TensorRT plans into {out} ({why})", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out.parent / f"timing-{target.fingerprint()}.cache"
    timing_cache = None
    from tqdm import tqdm

    for piece in tqdm(manifest.pieces, desc="build", unit="piece", disable=not progress, file=sys.stderr):
        flags = 0
        creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
        if creation is not None and hasattr(creation, "STRONGLY_TYPED"):
            flags |= 1 << int(creation.STRONGLY_TYPED)  # required on 10.x, implied (and ignored) on 11.x
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(Path(engine_dir) / piece.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse {piece.file}: {errors}")
        config = builder.create_builder_config()
        config.builder_optimization_level = opt_level
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_for(piece, ranges).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        if timing_cache is None:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            timing_cache = config.create_timing_cache(blob)
        config.set_timing_cache(timing_cache, False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelError(f"TensorRT failed to build {piece.file} (see the TensorRT log above)")
        (out / f"{piece.name}.plan").write_bytes(bytes(plan))
        cache_path.write_bytes(bytes(timing_cache.serialize()))
    write_record(engine_dir, manifest, target)
    return out


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_dir, precision: str | None = None):
        trt, torch = import_tensorrt()
        self.trt, self.torch = trt, torch
        manifest = load_manifest(engine_dir)
        self.manifest, self.config = manifest, manifest.config
        self.ranges = [tuple(r) for r in manifest.layer_ranges]
        precision = precision or manifest.dtype
        major, minor = torch.cuda.get_device_capability()
        target = find_built(engine_dir, manifest, torch.cuda.get_device_name(), f"{major}.{minor}", trt.__version__,
                            precision)
        if target is None:
            raise BackendError(f"no up-to-date TensorRT plans for this GPU, TensorRT {trt.__version__} and "
                               f"{precision}: run dllm-trt build {engine_dir}")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        d = plan_dir(engine_dir, target)
        self.engines, self.contexts = {}, {}
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        for p in manifest.pieces:
            engine = runtime.deserialize_cuda_engine((d / f"{p.name}.plan").read_bytes())
            if engine is None:
                raise BackendError(f"{d / (p.name + '.plan')}: TensorRT refused to load the plan; rebuild it")
            self.engines[p.name] = engine
            self.contexts[p.name] = engine.create_execution_context(strategy)
        self.act = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[manifest.dtype]
        self.device = torch.device("cuda")
        self.stream = torch.cuda.current_stream()  # torch's copies and TensorRT's kernels share one stream, in order
        scratch = max(e.device_memory_size_v2 for e in self.engines.values())
        self.scratch = torch.empty(scratch, dtype=torch.uint8, device=self.device)  # shared: pieces run in turn

    def describe(self) -> str:
        return f"tensorrt ({self.torch.cuda.get_device_name()}, {self.manifest.dtype})"

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
        host = self._host([outputs[f"drift.{L}"] for L in range(a, b)] +
                          [outputs[f"attn_colsum.{L}"] for L in range(a, b)])
        return RangeStats(colsum=np.stack(host[b - a:]), drift=np.stack(host[: b - a]))

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
        return RangeStats(colsum=np.stack(self._host([outputs[f"attn_colsum.{L}"] for L in range(a, b)])))

    def _head(self, rows):
        n = len(rows)
        tokens = self._empty(n, dtype=self.torch.int64)
        probs = self._empty(n, dtype=self.torch.float32)
        self._run("head", {"hidden_states": self.current, "rows": self._t(rows)}, {"tokens": tokens, "probs": probs})
        return tuple(self._host([tokens, probs]))
