"""TensorRT: load the plans `dllm-trt build` made (export/tensorrt_build.py) and run them, in either flavour:
TensorRT proper (`tensorrt`, 10.x/11.x: plans built on and for one GPU) or TensorRT for RTX (`tensorrt_rtx`, 1.x:
plans compiled ahead of time without a GPU for compute-capability targets, finished just in time on the user's GPU).
One plan per piece; a layer range's plan has a window and a refresh optimization profile, and the backend holds one
execution context per profile, switched to it once at load, so a call picks its mode's context and never switches
profiles. Every binding has the leading batch axis: several sequences go through one call, up to the plans' batch
profile (build --max-batch), padded as the contract says. Both flavours share the API used here (named
I/O tensors, execute_async_v3); their differences are the few lines marked "flavour:". Device memory comes from
torch CUDA tensors so caches sit at fixed addresses; only the small statistics and the head's tokens/probabilities
are copied to (pinned) host memory. Importing a flavour and its logger are here too, and shared with the builder.

Everything that needs no TensorRT (flavour choice, GPU support, fingerprints, plan cache decisions) is in
runtime/trt_plans.py.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelError
from ..manifest import TensorSpec, layer_names, load_manifest
from ..trt_plans import (FLAVOR_NAMES, FLAVORS, ONE_PROFILE, PlanError, StalePlan, choose_flavor, find_built,
                         gpu_support, plan_dir, profile_index, profile_modes, read_plan, read_record, replace_file)
from .base import Backend, BackendError, RangeStats, RowLimit, split_stats, stat_tensors
from .torch_backend import padded_rows, stacked_caches

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


def layer_dims(mode: str, n_positions: int, n_window: int, n_rows: int = 0, n_track: int = 0) -> dict[str, int]:
    """The dimensions a layer-range call for one sequence binds in `mode`. Window mode: the step's n_rows query rows and
    n_track tracked rows. Refresh mode: one query row per canvas slot (rows = seq_len) and one tracked row, whose
    drift is ignored."""
    if mode == "refresh":
        n_rows, n_track = n_positions, 1
    return {"batch": 1, "seq_len": n_positions, "rows": n_rows, "track_len": n_track, "window_len": n_window}


def shape_of(t: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    """A manifest tensor's shape with its named dimensions filled in."""
    return tuple(dims[d] if isinstance(d, str) else d for d in t.shape)


def check_profiles(path: Path, engine, kind: str) -> None:
    """A plan must have the optimization profiles this runtime selects by index (profile_modes)."""
    modes = profile_modes(kind)
    if engine.num_optimization_profiles != len(modes):
        raise BackendError(f"{path}: the plan has {engine.num_optimization_profiles} optimization profiles, this "
                           f"runtime expects {len(modes)} ({', '.join(modes)}); rebuild it with dllm-trt build")


def save_runtime_cache(cache, path: Path) -> None:
    """Replace (never write through) the RTX runtime cache next to the plans; at exit, so failing is not fatal."""
    try:
        replace_file(path, bytes(cache.serialize()))
    except OSError as e:
        print(f"warning: {path} not saved ({e.strerror})", file=sys.stderr)


class TensorRTBackend(Backend):
    """Step structure (docs/CONTRACT.md, "Step order"): every window pass is enqueued back to back on one stream,
    the statistics stay on the device until `fetch` copies all of them to pinned host memory and waits on one
    event, then refresh passes run from the first drifting range."""

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
        self.max_len, self.max_active = target.max_len, target.max_active   # the plans' limits (build may lower)
        self.max_batch = max(1, target.max_batch)   # their batch profiles: sequences one call may carry
        self.logger = make_logger(trt)  # kept: the bindings do not keep a Python logger (or the runtime) alive
        self.runtime = trt.Runtime(self.logger)
        d = plan_dir(engine_dir, target)
        record = read_record(engine_dir, target)
        hashes, sizes = record.get("plan_sha256", {}), record.get("plan_size", {})
        self.engines = {}
        for p in manifest.pieces:
            path = d / f"{p.name}.plan"
            self.engines[p.name] = load_plan(trt, self.runtime, path, flavor, hashes.get(p.name), sizes.get(p.name))
            check_profiles(path, self.engines[p.name], p.kind)
        self.activation_dtype = manifest.dtype
        self.act = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[manifest.dtype]
        self.dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "int64": torch.int64, "bool": torch.bool}
        self.device = torch.device("cuda")
        self.stream = torch.cuda.current_stream()  # torch's copies and TensorRT's kernels share one stream, in order
        self.no_track_rows = self._t(np.zeros((1, 1), dtype=np.int64))
        scratch = max(e.device_memory_size_v2 for e in self.engines.values())   # the largest profile of any plan
        self.scratch = torch.empty(scratch, dtype=torch.uint8, device=self.device)  # shared: pieces run in turn
        self.runtime_cache, self.runtime_configs = None, []
        self.contexts = {p.name: self._contexts(self.engines[p.name], p.kind, d / RUNTIME_CACHE)
                         for p in manifest.pieces}
        self._stat_host, self._stat_event = None, torch.cuda.Event()

    def _contexts(self, engine, kind: str, cache_path: Path) -> dict:
        """mode -> an execution context on that mode's optimization profile, using the shared scratch memory."""
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        contexts = {}
        for mode in profile_modes(kind):
            if self.flavor == "rtx":  # flavour: a runtime config per context, one runtime (JIT) cache shared by all
                ctx = engine.create_execution_context(self._runtime_config(engine, cache_path, strategy))
            else:
                ctx = engine.create_execution_context(strategy)
            try:  # setDeviceMemoryV2 (pointer + size) in the 10.x/11.x bindings
                ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            except (AttributeError, TypeError):  # bindings that only expose the pointer property
                ctx.device_memory = self.scratch.data_ptr()
            if not ctx.set_optimization_profile_async(profile_index(kind, mode), self.stream.cuda_stream):
                raise BackendError(f"{FLAVOR_NAMES[self.flavor]} cannot select the {mode} optimization profile of a "
                                   f"{kind} plan; rebuild the plans with dllm-trt build")
            contexts[mode] = ctx
        return contexts

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

    def _run(self, name: str, mode: str, dims: dict[str, int], inputs: dict, bound: dict) -> dict:
        """Enqueue one piece on its `mode` profile, on the backend's stream. inputs and bound outputs are device
        tensors; every other output is allocated at its shape for `dims`. Returns every output by name."""
        piece, ctx = self.manifest.piece(name), self.contexts[name][mode]
        outputs = {t.name: bound[t.name] if t.name in bound else self._empty(*shape_of(t, dims),
                                                                            dtype=self.dtypes[t.dtype])
                   for t in piece.outputs}
        for tensor, t in inputs.items():
            if not ctx.set_input_shape(tensor, tuple(t.shape)):
                raise BackendError(f"{name}: input {tensor} of shape {tuple(t.shape)} is outside the plan's {mode} "
                                   f"profile; rebuild the plans with dllm-trt build")
            ctx.set_tensor_address(tensor, t.data_ptr())
        for tensor, t in outputs.items():
            ctx.set_tensor_address(tensor, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise BackendError(f"{FLAVOR_NAMES[self.flavor]} failed to enqueue {name} ({mode} mode)")
        return outputs

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

    # ---- one sequence's buffers --------------------------------------------------------------------------------
    def _allocate(self, n: int) -> "TrtCanvas":
        if n > self.max_len:
            raise ModelError(f"the canvas needs {n} positions but the plans were built for at most {self.max_len} "
                             f"(rebuild with a larger --max-len, up to the export's)")
        c = self.config
        shape, hidden = (1, c.n_heads, n, c.head_dim), (1, n, c.d_model)
        return TrtCanvas(
            n=n, k=[self._empty(*shape) for _ in range(c.n_layers)], v=[self._empty(*shape) for _ in range(c.n_layers)],
            q=[self._empty(*shape) for _ in range(c.n_layers)],
            boundary=[self._empty(*hidden) for _ in range(len(self.ranges) + 1)],
            positions=self._t(np.arange(n, dtype=np.int64)[None]),
            canvas_lengths=self._t(np.array([n], dtype=np.int64)),
            # refresh mode reads no cached key/value and tracks nothing (its drift output is not used): every
            # layer's past key/value input is bound to one scratch buffer of cache shape, its tracked query to one
            # query row
            unread_cache=self._empty(*shape), no_track_queries=self._empty(1, c.n_heads, 1, c.head_dim))

    def _use(self, canvas: "TrtCanvas") -> None:
        self.canvas = canvas

    # the buffers of the sequence in use (the single-sequence passes below read and write these)
    k = property(lambda self: self.canvas.k)
    v = property(lambda self: self.canvas.v)
    q = property(lambda self: self.canvas.q)
    boundary = property(lambda self: self.canvas.boundary)
    positions = property(lambda self: self.canvas.positions)
    canvas_lengths = property(lambda self: self.canvas.canvas_lengths)
    unread_cache = property(lambda self: self.canvas.unread_cache)
    no_track_queries = property(lambda self: self.canvas.no_track_queries)

    @property
    def current(self):
        return self.canvas.current

    @current.setter
    def current(self, hidden) -> None:
        self.canvas.current = hidden

    def free_cache_memory(self) -> int | None:
        return int(self.torch.cuda.mem_get_info()[0])   # the caches live on the GPU

    def _check_active(self, count: int, what: str) -> None:
        if count > self.max_active:
            raise RowLimit(f"{what} needs {count} rows but the plans were built for at most {self.max_active} "
                             f"(rebuild with a larger --max-active, up to the export's)")

    def _embed(self, ids, positions):
        dims = {"batch": 1, "n_tokens": len(ids)}
        if positions is None:
            self._run("embed", ONE_PROFILE, dims, {"input_ids": self._t(ids[None])},
                      {"hidden_states": self.boundary[0]})
            self.current = self.boundary[0]
            return
        self._check_active(len(ids), "a window pass")
        out = self._run("embed", ONE_PROFILE, dims, {"input_ids": self._t(ids[None])}, {})["hidden_states"]
        self.boundary[0].index_copy_(1, self._t(positions), out)
        self.current = out

    def _window(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        a, b = self.ranges[r]
        layers = [layer_names(L) for L in range(a, b)]
        pos, track = self._t(positions), self._t(track_positions)
        dims = layer_dims("window", self.n_positions, len(window_rows), len(positions), len(track_rows))
        inputs = {"hidden_states": self.current, "position_ids": pos[None], "canvas_lengths": self.canvas_lengths,
                  "key_is_mask": self._t(key_is_mask[None]), "track_rows": self._t(track_rows[None]),
                  "window_rows": self._t(window_rows[None])}
        for L, n in zip(range(a, b), layers):
            inputs |= {n.past_key: self.k[L], n.past_value: self.v[L],
                       n.track_queries: self.q[L].index_select(2, track)}
        out = self._run(self.manifest.range_piece(r).name, "window", dims, inputs, {})
        for L, n in zip(range(a, b), layers):  # write the new rows into the caches, on the device
            self.k[L].index_copy_(2, pos, out[n.new_key])
            self.v[L].index_copy_(2, pos, out[n.new_value])
            self.q[L].index_copy_(2, pos, out[n.new_queries])
        self.boundary[r + 1].index_copy_(1, pos, out["hidden_states_out"])
        self.current = out["hidden_states_out"]
        return RangeStats(colsum=self.torch.cat([out[n.colsum] for n in layers]),
                          drift=self.torch.cat([out[n.drift] for n in layers]))

    def _refresh(self, r, window_positions, key_is_mask):
        # a window pass whose query rows are every slot: no cached key/value is read (see LayerRange.forward), so
        # the new keys, values and queries go straight onto the caches
        a, b = self.ranges[r]
        layers = [layer_names(L) for L in range(a, b)]
        dims = layer_dims("refresh", self.n_positions, len(window_positions))
        inputs = {"hidden_states": self.boundary[r], "position_ids": self.positions,
                  "canvas_lengths": self.canvas_lengths, "key_is_mask": self._t(key_is_mask[None]),
                  "track_rows": self.no_track_rows, "window_rows": self._t(window_positions[None])}
        bound = {"hidden_states_out": self.boundary[r + 1]}
        for L, n in zip(range(a, b), layers):
            inputs |= {n.past_key: self.unread_cache, n.past_value: self.unread_cache,
                       n.track_queries: self.no_track_queries}
            bound |= {n.new_key: self.k[L], n.new_value: self.v[L], n.new_queries: self.q[L]}
        out = self._run(self.manifest.range_piece(r).name, "refresh", dims, inputs, bound)
        self.current = self.boundary[r + 1]
        return RangeStats(colsum=self.torch.cat([out[n.colsum] for n in layers]))

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
        dims = {"batch": 1, "n_hidden": self.current.shape[1], "n_rows": len(rows)}
        out = self._run("head", ONE_PROFILE, dims, {"hidden_states": self.current, "rows": self._t(rows[None])}, {})
        tokens, probs = self._host([out["tokens"], out["probs"]])
        return tokens[0], probs[0]

    # ---- several sequences per call, on the plans' batch profiles: inputs padded as the contract says, each
    # sequence's caches stacked for the call and its new rows copied back (as the ONNX Runtime backend does) --------
    def _padded(self, rows: list, fill, length: int | None = None):
        return padded_rows(self.torch, self.device, rows, fill, length)

    def _embed_many(self, canvases, ids, positions):
        tokens = self._padded(ids, 0)
        hidden = self._run("embed", ONE_PROFILE, {"batch": len(ids), "n_tokens": tokens.shape[1]},
                           {"input_ids": tokens}, {})["hidden_states"]
        for i, (c, p) in enumerate(zip(canvases, positions)):
            if p is None:
                c.boundary[0][0].copy_(hidden[i, : c.n])
                c.current = c.boundary[0]
            else:
                self._check_active(len(p), "a window pass")
                c.boundary[0][0].index_copy_(0, self._t(p), hidden[i, : len(p)])
                c.current = hidden[i: i + 1, : len(p)]

    def _window_many(self, r, canvases, positions, track_rows, track_positions, window_rows, key_is_mask):
        a, b = self.ranges[r]
        layers = [layer_names(L) for L in range(a, b)]
        longest = max(c.n for c in canvases)
        inputs = {"hidden_states": self._padded([c.current[0] for c in canvases], 0.0),
                  "position_ids": self._padded(positions, -1),
                  "canvas_lengths": self._t(np.array([c.n for c in canvases], dtype=np.int64)),
                  "key_is_mask": self._padded(key_is_mask, True, longest),
                  "track_rows": self._padded(track_rows, -1), "window_rows": self._padded(window_rows, -1)}
        n_track = inputs["track_rows"].shape[1]
        for L, n in zip(range(a, b), layers):
            inputs |= {n.past_key: stacked_caches(self.torch, [c.k[L][0] for c in canvases], longest),
                       n.past_value: stacked_caches(self.torch, [c.v[L][0] for c in canvases], longest),
                       n.track_queries: stacked_caches(self.torch, [c.q[L][0][:, self._t(t)] for c, t in
                                                                    zip(canvases, track_positions)], n_track)}
        dims = {"batch": len(canvases), "seq_len": longest, "rows": inputs["position_ids"].shape[1],
                "track_len": n_track, "window_len": inputs["window_rows"].shape[1]}
        out = self._run(self.manifest.range_piece(r).name, "window", dims, inputs, {})
        hidden, stats = out["hidden_states_out"], []
        for i, (c, p) in enumerate(zip(canvases, positions)):
            pos, rows = self._t(p), len(p)
            for L, n in zip(range(a, b), layers):
                c.k[L][0].index_copy_(1, pos, out[n.new_key][i, :, :rows])
                c.v[L][0].index_copy_(1, pos, out[n.new_value][i, :, :rows])
                c.q[L][0].index_copy_(1, pos, out[n.new_queries][i, :, :rows])
            c.boundary[r + 1][0].index_copy_(0, pos, hidden[i, :rows])
            c.current = hidden[i: i + 1, :rows]
            stats.append(RangeStats(colsum=self.torch.stack([out[n.colsum][i, : c.n] for n in layers]),
                                    drift=self.torch.stack([out[n.drift][i] for n in layers])))
        return stats

    def _refresh_many(self, r, canvases, window_positions, key_is_mask):
        a, b = self.ranges[r]
        layers = [layer_names(L) for L in range(a, b)]
        batch, longest, cfg = len(canvases), max(c.n for c in canvases), self.config
        unread = self._empty(batch, cfg.n_heads, longest, cfg.head_dim)
        no_track = self.torch.zeros((batch, cfg.n_heads, 1, cfg.head_dim), dtype=self.act, device=self.device)
        inputs = {"hidden_states": self._padded([c.boundary[r][0] for c in canvases], 0.0),
                  "position_ids": self._padded([c.positions[0] for c in canvases], -1),
                  "canvas_lengths": self._t(np.array([c.n for c in canvases], dtype=np.int64)),
                  "key_is_mask": self._padded(key_is_mask, True, longest),
                  "track_rows": self._t(np.zeros((batch, 1), dtype=np.int64)),
                  "window_rows": self._padded(window_positions, -1)}
        for n in layers:
            inputs |= {n.past_key: unread, n.past_value: unread, n.track_queries: no_track}
        dims = {"batch": batch, "seq_len": longest, "rows": longest, "track_len": 1,
                "window_len": inputs["window_rows"].shape[1]}
        out = self._run(self.manifest.range_piece(r).name, "refresh", dims, inputs, {})
        stats = []
        for i, c in enumerate(canvases):
            for L, n in zip(range(a, b), layers):
                c.k[L][0].copy_(out[n.new_key][i, :, : c.n])
                c.v[L][0].copy_(out[n.new_value][i, :, : c.n])
                c.q[L][0].copy_(out[n.new_queries][i, :, : c.n])
            c.boundary[r + 1][0].copy_(out["hidden_states_out"][i, : c.n])
            c.current = c.boundary[r + 1]
            stats.append(RangeStats(colsum=self.torch.stack([out[n.colsum][i, : c.n] for n in layers])))
        return stats

    def _head_many(self, canvases, rows):
        # only the rows to decode are handed over, as the ONNX Runtime backend does
        hidden = self._padded([c.current[0][self._t(r)] for c, r in zip(canvases, rows)], 0.0)
        picked = self._padded([np.arange(len(r), dtype=np.int64) for r in rows], -1)
        dims = {"batch": len(rows), "n_hidden": hidden.shape[1], "n_rows": picked.shape[1]}
        out = self._run("head", ONE_PROFILE, dims, {"hidden_states": hidden, "rows": picked}, {})
        tokens, probs = self._host([out["tokens"], out["probs"]])
        return [(tokens[i, : len(r)], probs[i, : len(r)]) for i, r in enumerate(rows)]


@dataclass
class TrtCanvas:
    """One sequence's device buffers: per layer key, value, query caches [1, H, n, hd]; the hidden states entering
    each range and after the last one [1, n, D]; what refresh passes bind; the rows the next pass reads."""
    n: int
    k: list
    v: list
    q: list
    boundary: list
    positions: object
    canvas_lengths: object
    unread_cache: object
    no_track_queries: object
    current: object = None
