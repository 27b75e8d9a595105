"""The ONNX Runtime backend: one InferenceSession per exported piece (one per layer range, serving window and refresh
passes), persistent caches bound with IOBinding.

Refresh outputs are bound straight onto the cache buffers (no copy of a whole cache per call); window outputs are
the new rows only and are written into the caches. The caches are numpy arrays on CPU and OrtValues on the device
with the CUDA execution provider, so that no cache crosses to the host (ort_arrays.py). Only numpy and onnxruntime
are imported on the CPU path.

Weights (CPU): every external tensor is one OrtValue on a read-only memory map of its data file (runtime/memory.py),
given to the session that uses it, so the sessions hold no copies and processes serving the same folder share the
pages. Pre-packing is off in that mode: it would make a private packed copy next to the mapping (it costs the
25-row window pass about 16% more CPU time on a 0.42 B model; the refresh pass about 4%; see
tools/bench_memory.py). DLLM_TRT_ORT_WEIGHTS=per-session restores ONNX Runtime's own loading.
Quantized engines (MatMulNBits) pre-pack by default even so: without its packed layout MatMulNBits falls back to
dequantizing every weight on every call, 6-8x slower than fp32 (tools/bench_quant.py); the packed int4/int8 copies
are private to each session, and each piece's mapped pages are dropped once its session has packed them
(SharedWeights.release).

Threads: every session gets the physical cores this process may use (default_threads), never the logical ones.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelError
from ..manifest import layer_names, load_manifest, range_name
from ..memory import SharedWeights
from .base import Backend, BackendError, RangeStats, RowLimit
from .ort_arrays import DeviceArrays, HostArrays, as_ortvalue


THREADS_ENV = "DLLM_TRT_THREADS"       # intra-op threads per session; default: physical cores (see default_threads)
WEIGHTS_ENV = "DLLM_TRT_ORT_WEIGHTS"   # "shared" (default) or "per-session" (ONNX Runtime's own loading)
GRAPH_OPTIMIZATION = "extended"       # ONNX Runtime's graph rewrites: "extended" (fusions) or "basic"
LOAD_WORKERS = 4                       # sessions built at once at start-up (at most the physical cores)
CACHES_ENV = "DLLM_TRT_ORT_CACHES"     # "host" (numpy) or "device" (OrtValues); default: device off the CPU
PREPACK_ENV = "DLLM_TRT_ORT_PREPACK"   # "1" / "0"; default: pre-pack when sessions have their own weights or the
                                       # engine is quantized


def physical_cores(cpus: set[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask): SMT siblings share one core's
    execution units, and a second ONNX Runtime thread on a sibling mostly waits for the first. Cores are told
    apart by (package, core id) from sysfs; where that cannot be read, every allowed CPU counts as a core."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            topo = sysfs / f"cpu{c}" / "topology"
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs a container's cgroup (v2) quota allows, rounded up; None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """$DLLM_TRT_THREADS, else the physical cores this process may use (capped by a cgroup CPU quota)."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not (env.isascii() and env.isdigit()) or int(env[:12]) < 1:
            raise BackendError(f"{THREADS_ENV} must be a positive whole number, got {env[:40]!r}")
        return int(env) if len(env) <= 12 else 10 ** 12  # no 5000-digit int() (ValueError); capped anyway
    limit = cgroup_cpu_limit()
    return min(physical_cores(), limit) if limit else physical_cores()


def usable_cpus() -> int:
    """Logical CPUs this process may run on (affinity mask, cgroup quota): threads beyond them only wait, and
    thousands of them exhaust the machine's process table."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def session_threads(requested: int | None) -> int:
    """Intra-op threads per session: the request (else default_threads), capped at usable_cpus with one line."""
    n = default_threads() if requested is None else requested
    if n < 1:
        raise BackendError(f"threads must be at least 1, got {n}")
    cap = usable_cpus()
    if n > cap:
        print(f"dllm-trt: {n} threads asked for; using {cap}, the CPUs this process may use", file=sys.stderr)
        return cap
    return n


def weight_mode(share_weights: bool | None, prepack: bool | None, quantized: bool = False) -> tuple[bool, bool]:
    if share_weights is None:
        mode = os.environ.get(WEIGHTS_ENV, "shared")
        if mode not in ("shared", "per-session"):
            raise BackendError(f"{WEIGHTS_ENV} must be 'shared' or 'per-session', got {mode!r}")
        share_weights = mode == "shared"
    if prepack is None:
        prepack = os.environ.get(PREPACK_ENV, "0" if share_weights and not quantized else "1") == "1"
    return share_weights, prepack


_ARENA_REGISTERED = []


def shared_cpu_arena(ort) -> None:
    """One CPU arena for every session of the process (registered once), instead of one per session."""
    if not _ARENA_REGISTERED:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        _ARENA_REGISTERED.append(info)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, engine_dir: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 share_weights: bool | None = None, prepack: bool | None = None, caches: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                               "(or onnxruntime-gpu)") from None
        self.ort = ort
        self.manifest = load_manifest(engine_dir)
        self.config, self.calibration = self.manifest.config, self.manifest.calibration
        self.activation_dtype = self.manifest.dtype
        self.ranges = [tuple(r) for r in self.manifest.layer_ranges]
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.providers = providers   # names, or (name, provider options) pairs as ONNX Runtime takes them
        self.provider = providers[0] if isinstance(providers[0], str) else providers[0][0]
        self.on_cpu = self.provider == "CPUExecutionProvider"
        if self.manifest.dtype != "fp32" and self.on_cpu:
            raise BackendError(f"{engine_dir} holds {self.manifest.dtype} graphs, which are meant for TensorRT; "
                               f"ONNX Runtime on CPU has no {self.manifest.dtype} kernels: export with --dtype fp32")
        self.threads = session_threads(threads)
        # the data files, each once (shared or loaded by ONNX Runtime itself, as 4-bit tables are); their sizes
        # were checked against the manifest when it was loaded
        self.weight_bytes = self.manifest.weight_bytes()
        self.share_weights, self.prepack = weight_mode(share_weights, prepack, bool(self.manifest.quantization))
        if not self.on_cpu:
            # a GPU session copies its initializers to the device anyway: leave loading to ONNX Runtime there
            self.share_weights, self.prepack = False, True
        d = Path(engine_dir)
        shared = SharedWeights(ort.OrtValue) if self.share_weights else None
        self.initializer_addresses: dict[str, dict[str, int]] = {}   # piece -> shared tensor -> buffer address
        try:
            self.sessions = self._sessions(d, shared)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise ModelError(f"{engine_dir}: ONNX Runtime cannot load the pieces ({str(e).splitlines()[0]})") from None
        self.shared = shared
        self._check_started(engine_dir)
        self.arrays = self._arrays(caches)
        # one_sync_per_step stays False even on a GPU: ONNX Runtime waits for the device at the end of every run,
        # so running every window pass before reading the statistics would save no wait, only cost the window
        # passes a drift makes useless
        self.max_len = self.manifest.dims["seq_len"]["max"]
        self.max_active = self.manifest.max_active
        # several sequences per call where the caches are numpy arrays (stacked for each call); one on a device
        self.max_batch = 1 if self.device_caches else self.manifest.dims["batch"]["max"]
        self.no_track_rows = np.zeros((1, 1), dtype=np.int64)
        self._scratches: dict[str, np.ndarray] = {}   # the stacked inputs of batched calls, reused by shape

    @property
    def device_caches(self) -> bool:
        return isinstance(self.arrays, DeviceArrays)

    def _check_started(self, engine_dir) -> None:
        """The provider the sessions really run on: onnxruntime-gpu lists CUDA even where its libraries cannot load,
        and then falls back to the CPU with a log line. Say so, and go on as a CPU backend."""
        started = next(iter(self.sessions.values())).get_providers()[0]
        if started == self.provider:
            return
        if started == "CPUExecutionProvider" and self.manifest.dtype != "fp32":
            raise BackendError(f"{engine_dir}: ONNX Runtime could not start {self.provider} and fell back to the "
                               f"CPU, which has no {self.manifest.dtype} kernels (see `dllm-trt doctor`)")
        print(f"warning: ONNX Runtime could not start {self.provider}; running on {started}", file=sys.stderr)
        self.provider, self.providers = started, [started]
        self.on_cpu = started == "CPUExecutionProvider"

    def _arrays(self, caches: str | None):
        caches = caches or os.environ.get(CACHES_ENV) or ("host" if self.on_cpu else "device")
        if caches == "host":
            return HostArrays(self.manifest.dtype)
        if caches != "device":
            raise BackendError(f"caches must be 'host' or 'device' ({CACHES_ENV}), got {caches!r}")
        device = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}.get(self.provider)
        if device is None:
            raise BackendError(f"caches on the device are implemented for the CPU and CUDA providers, "
                               f"not {self.provider}")
        options = {} if isinstance(self.providers[0], str) else self.providers[0][1]
        return DeviceArrays(self.ort, self.manifest.dtype, self.providers, device, int(options.get("device_id", 0)))

    def _options(self, threads: int | None):
        ort = self.ort
        opts = ort.SessionOptions()
        # Pieces run one after another, never concurrently: all cores for each, and no spinning threads left
        # behind by one session to fight the next one.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The extended fusions (FusedMatMul absorbing the key transposes and the score scale, ...) make a window
        # pass of the format-2 graphs faster at every size (bundled model: 25% per call at batch 1, 8% more
        # tokens/s, 10% at batch 32; a mid-size int4 window step 8%) for about 4 ms more start-up per session
        # (docs/BENCHMARKS.md sections 12 and 16).
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                                         if GRAPH_OPTIMIZATION == "extended"
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not self.prepack:
            # a pre-packed copy would be private to the session, next to the shared mapping
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.share_weights:
            # A memory pattern is planned per input shape and allocated as one new block at the second run of
            # each canvas length (fresh pages: a slow first request); without it the arena's free chunks serve
            # every length once warmup() has grown it. One arena for all sessions: their runs never overlap.
            opts.enable_mem_pattern = False
            shared_cpu_arena(ort)
            opts.add_session_config_entry("session.use_env_allocators", "1")
        opts.log_severity_level = 3
        return opts

    def _sessions(self, d: Path, shared: SharedWeights | None) -> dict:
        """Every piece's session. Options and shared initializers are prepared here (Python, in order); the
        sessions are then built side by side, since ONNX Runtime releases the GIL while it loads and optimizes a
        graph (start-up is mostly that: see tools/bench_startup.py)."""
        from concurrent.futures import ThreadPoolExecutor

        pieces = self.manifest.pieces
        opts = [self._session_options(p.name, d / p.file, shared) for p in pieces]

        def build(i: int):
            session = self.ort.InferenceSession(str(d / pieces[i].file), opts[i], providers=self.providers)
            session.shared_weights = shared  # the OrtValues point into these mappings: keep them with the session
            if shared is not None and self.prepack and pieces[i].data_file:
                # the kernels read their pre-packed copies now: the mapped pages need not stay resident too (a
                # quantized engine would hold its weights twice; see docs/BENCHMARKS.md section 15)
                shared.release(d / pieces[i].data_file)
            return session

        with ThreadPoolExecutor(max(1, min(len(pieces), physical_cores(), LOAD_WORKERS))) as pool:
            return dict(zip((p.name for p in pieces), pool.map(build, range(len(pieces)))))

    def _session_options(self, piece: str, path: Path, shared: SharedWeights | None):
        opts = self._options(self.threads)
        self.initializer_addresses[piece] = {}
        if shared is not None:
            # add_initializer (unlike add_external_initializers, which copies) makes the session use the
            # OrtValue's memory as is: ONNX Runtime's way of sharing initializers between sessions
            for name, value in zip(*shared.initializers(path)):
                opts.add_initializer(name, value)
                self.initializer_addresses[piece][name] = value.data_ptr()
        return opts

    def describe(self) -> str:
        q = self.manifest.quantization
        weights = f", {q['scheme']} weights" if q else ""
        provider = self.provider.removesuffix("ExecutionProvider").lower()
        return f"onnxruntime ({provider}, {self.manifest.dtype}{weights})"

    def warmup(self, max_len: int | None = None) -> None:
        """Run every piece once at its largest shapes (canvas max_len, max_active query rows), so that the weights
        are paged in and every session's arena has grown before the first request, not during it."""
        n = max(2, min(max_len or self.max_len, self.max_len))
        rows = np.arange(min(self.max_active, n), dtype=np.int64)
        key_is_mask = np.zeros(n, dtype=bool)
        ids = np.full(n, self.config.mask_token_id, dtype=np.int64)
        self.begin(n)
        self.embed(ids)
        for r in range(len(self.ranges)):
            self.refresh(r, rows, key_is_mask)
        self.head(rows)
        self.embed(ids[rows], rows)
        for r in range(len(self.ranges)):
            self.window(r, rows, rows, rows, key_is_mask)
        self.head(rows)
        self.close(self._own)   # drop the warm-up caches, spares on a device included
        self._own = None
        self.arrays.recycle([], set())

    # ---- running one piece with IOBinding ----------------------------------------------------------------------
    def _run(self, piece: str, inputs: dict, bound_outputs: dict, kept_outputs: list[str],
             host_outputs: list[str] = ()) -> dict:
        """Run a piece. inputs and bound_outputs are numpy arrays or OrtValues (bound outputs are written in place);
        kept_outputs come back where the caches live (self.arrays), host_outputs as numpy arrays, both by name."""
        session = self.sessions[piece]
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, as_ortvalue(self.ort, value))
        for name, value in bound_outputs.items():
            binding.bind_ortvalue_output(name, as_ortvalue(self.ort, value))
        for name in kept_outputs:
            binding.bind_output(name, self.arrays.device, self.arrays.device_id)
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()[len(bound_outputs):]
        kept = {name: self.arrays.kept(v) for name, v in zip(kept_outputs, outputs)}
        return kept | {name: v.numpy() for name, v in zip(host_outputs, outputs[len(kept_outputs):])}

    # ---- one sequence's buffers --------------------------------------------------------------------------------
    def _allocate(self, n: int) -> "OrtCanvas":
        if n > self.max_len:
            raise ModelError(f"the canvas needs {n} positions but the engines were exported for at most "
                             f"{self.max_len} (re-export with a larger --max-len)")
        c, buffer = self.config, self.arrays.buffer
        shape, hidden, one_row = (1, c.n_heads, n, c.head_dim), (1, n, c.d_model), (1, c.n_heads, 1, c.head_dim)
        self.arrays.recycle([], {shape, hidden, one_row})   # spares of other canvas lengths are not kept
        return OrtCanvas(
            n=n, k=[buffer(shape) for _ in range(c.n_layers)], v=[buffer(shape) for _ in range(c.n_layers)],
            q=[buffer(shape) for _ in range(c.n_layers)], boundary=[buffer(hidden) for _ in self.ranges],
            final=buffer(hidden), positions=np.arange(n, dtype=np.int64)[None],
            canvas_lengths=np.array([n], dtype=np.int64),
            # refresh mode reads no cached key/value and tracks nothing (its drift output is not used): every
            # layer's past key/value input is bound to one scratch buffer of cache shape, its tracked query to one
            # query row
            unread_cache=buffer(shape), no_track_queries=buffer(one_row))

    def _use(self, canvas: "OrtCanvas") -> None:
        self.canvas = canvas

    # the buffers of the sequence in use, under the names every backend gives them (tests compare through these)
    k = property(lambda self: self.canvas.k)
    v = property(lambda self: self.canvas.v)
    q = property(lambda self: self.canvas.q)
    boundary = property(lambda self: self.canvas.boundary)
    final = property(lambda self: self.canvas.final)
    current = property(lambda self: self.canvas.current)

    def _buffers(self) -> list:
        return self.canvas.buffers()

    def _release(self, canvas: "OrtCanvas") -> None:
        self.arrays.recycle(canvas.buffers())

    def free_cache_memory(self) -> int | None:
        return super().free_cache_memory() if not self.device_caches else None   # device memory: not known here

    def _check_active(self, count: int, what: str) -> None:
        if count > self.max_active:
            raise RowLimit(f"{what} needs {count} rows but the engines were exported for at most "
                             f"{self.max_active} (re-export with a larger --max-active)")

    # ---- one sequence: every array has batch 1 and the caches are bound as they are -----------------------------
    def _embed(self, ids, positions):
        c = self.canvas
        if positions is None:
            self._run("embed", {"input_ids": ids[None]}, {"hidden_states": c.boundary[0]}, [])
            c.current = c.boundary[0]
            c.filled = True   # the start of a full refresh (every policy's first step is one)
        else:
            self._check_active(len(ids), "a window pass")
            hidden = self._run("embed", {"input_ids": ids[None]}, {}, ["hidden_states"])["hidden_states"]
            (c.boundary[0],) = self.arrays.put_rows([c.boundary[0]], [1], positions, [hidden])
            c.current = hidden

    def _window(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        c = self.canvas
        if not c.filled:
            raise ValueError("window mode needs caches filled by a full refresh (every policy starts with one)")
        layers = range(*self.ranges[r])
        names = [layer_names(L) for L in layers]
        inputs = {"hidden_states": c.current, "position_ids": positions[None],
                  "canvas_lengths": c.canvas_lengths, "key_is_mask": key_is_mask[None],
                  "track_rows": track_rows[None], "window_rows": window_rows[None]}
        tracked = self.arrays.take_rows([c.q[L] for L in layers], 2, track_positions)
        for L, n, track_queries in zip(layers, names, tracked):
            inputs |= {n.past_key: c.k[L], n.past_value: c.v[L], n.track_queries: track_queries}
        new_rows = [name for n in names for name in (n.new_key, n.new_value, n.new_queries)]
        out = self._run(range_name(*self.ranges[r]), inputs, {}, ["hidden_states_out", *new_rows],
                        [name for n in names for name in (n.drift, n.colsum)])
        # the range's new K/V/Q rows and its output hidden states, written in one go (one helper run on a device)
        caches = [cache[L] for L in layers for cache in (c.k, c.v, c.q)]
        axes, rows = [2] * len(caches), [out[name] for name in new_rows]
        if r + 1 < len(self.ranges):
            caches, axes, rows = caches + [c.boundary[r + 1]], axes + [1], rows + [out["hidden_states_out"]]
        written = self.arrays.put_rows(caches, axes, positions, rows)
        for i, L in enumerate(layers):
            c.k[L], c.v[L], c.q[L] = written[3 * i: 3 * i + 3]
        if r + 1 < len(self.ranges):
            c.boundary[r + 1] = written[-1]
        c.current = out["hidden_states_out"]
        return RangeStats(colsum=np.concatenate([out[n.colsum] for n in names]),
                          drift=np.concatenate([out[n.drift] for n in names]))

    def _refresh(self, r, window_positions, key_is_mask):
        # a window pass whose query rows are every slot: no cached value is read, cached keys only by the drift,
        # which is ignored here (see LayerRange.forward)
        c = self.canvas
        layers = range(*self.ranges[r])
        names = [layer_names(L) for L in layers]
        target = c.boundary[r + 1] if r + 1 < len(self.ranges) else c.final
        inputs = {"hidden_states": c.boundary[r], "position_ids": c.positions,
                  "canvas_lengths": c.canvas_lengths, "key_is_mask": key_is_mask[None],
                  "track_rows": self.no_track_rows, "window_rows": window_positions[None]}
        bound = {"hidden_states_out": target}
        for L, n in zip(layers, names):
            inputs |= {n.past_key: c.unread_cache, n.past_value: c.unread_cache,
                       n.track_queries: c.no_track_queries}
            bound |= {n.new_key: c.k[L], n.new_value: c.v[L], n.new_queries: c.q[L]}
        out = self._run(range_name(*self.ranges[r]), inputs, bound, [],
                        [name for n in names for name in (n.drift, n.colsum)])
        c.current = target
        return RangeStats(colsum=np.concatenate([out[n.colsum] for n in names]))

    def _head(self, rows):
        out = self._run("head", {"hidden_states": self.canvas.current, "rows": rows[None]}, {}, [],
                        ["tokens", "probs"])
        return out["tokens"][0], out["probs"][0]

    # ---- several sequences in one call (host caches): inputs padded to the longest, caches stacked -------------
    # Padding follows the contract: -1 rows after the real ones, canvas slots past canvas_lengths. Each sequence's
    # caches are copied into one stacked buffer per layer ([batch, heads, longest canvas, head_dim]) for the call,
    # and its new rows copied back: the pieces read one tensor per input.
    def _embed_many(self, canvases, ids, positions):
        hidden = self._run("embed", {"input_ids": _padded(ids, 0)}, {}, ["hidden_states"])["hidden_states"]
        for i, (c, p) in enumerate(zip(canvases, positions)):
            if p is None:
                c.boundary[0][0] = hidden[i, : c.n]
                c.current, c.filled = c.boundary[0], True
            else:
                self._check_active(len(p), "a window pass")
                c.boundary[0][0, p] = hidden[i, : len(p)]
                c.current = hidden[i: i + 1, : len(p)]

    def _window_many(self, r, canvases, positions, track_rows, track_positions, window_rows, key_is_mask):
        if not all(c.filled for c in canvases):
            raise ValueError("window mode needs caches filled by a full refresh (every policy starts with one)")
        layers = range(*self.ranges[r])
        names = [layer_names(L) for L in layers]
        longest = max(c.n for c in canvases)
        inputs = {"hidden_states": _padded([c.current[0] for c in canvases], 0.0),
                  "position_ids": _padded(positions, -1),
                  "canvas_lengths": np.array([c.n for c in canvases], dtype=np.int64),
                  "key_is_mask": _padded(key_is_mask, True, longest), "track_rows": _padded(track_rows, -1),
                  "window_rows": _padded(window_rows, -1)}
        n_track = max(len(t) for t in track_positions)
        for L, n in zip(layers, names):
            j = L - layers[0]   # stacking buffers are per layer of a range, shared by the ranges
            inputs |= {n.past_key: self._stacked([c.k[L] for c in canvases], longest, f"key{j}"),
                       n.past_value: self._stacked([c.v[L] for c in canvases], longest, f"value{j}"),
                       n.track_queries: self._stacked([c.q[L][:, :, t] for c, t in zip(canvases, track_positions)],
                                                      n_track, f"query{j}")}
        out = self._run(range_name(*self.ranges[r]), inputs, {}, [],
                        ["hidden_states_out"] + [name for n in names for name in
                                                 (n.new_key, n.new_value, n.new_queries, n.drift, n.colsum)])
        hidden, stats = out["hidden_states_out"], []
        for i, (c, p) in enumerate(zip(canvases, positions)):
            rows = len(p)
            for L, n in zip(layers, names):
                c.k[L][0][:, p] = out[n.new_key][i, :, :rows]
                c.v[L][0][:, p] = out[n.new_value][i, :, :rows]
                c.q[L][0][:, p] = out[n.new_queries][i, :, :rows]
            if r + 1 < len(self.ranges):
                c.boundary[r + 1][0][p] = hidden[i, :rows]
            c.current = hidden[i: i + 1, :rows]
            stats.append(RangeStats(colsum=np.stack([out[n.colsum][i, : c.n] for n in names]),
                                    drift=np.stack([out[n.drift][i] for n in names])))
        return stats

    def _refresh_many(self, r, canvases, window_positions, key_is_mask):
        layers = range(*self.ranges[r])
        names = [layer_names(L) for L in layers]
        batch, longest = len(canvases), max(c.n for c in canvases)
        c0 = self.config
        unread = self._scratch("unread", (batch, c0.n_heads, longest, c0.head_dim))
        inputs = {"hidden_states": _padded([c.boundary[r][0] for c in canvases], 0.0),
                  "position_ids": _padded([c.positions[0] for c in canvases], -1),
                  "canvas_lengths": np.array([c.n for c in canvases], dtype=np.int64),
                  "key_is_mask": _padded(key_is_mask, True), "track_rows": np.zeros((batch, 1), dtype=np.int64),
                  "window_rows": _padded(window_positions, -1)}
        no_track = self._scratch("no_track", (batch, c0.n_heads, 1, c0.head_dim))
        for n in names:
            inputs |= {n.past_key: unread, n.past_value: unread, n.track_queries: no_track}
        out = self._run(range_name(*self.ranges[r]), inputs, {}, [],
                        ["hidden_states_out"] + [name for n in names for name in
                                                 (n.new_key, n.new_value, n.new_queries, n.colsum)])
        stats = []
        for i, c in enumerate(canvases):
            for L, n in zip(layers, names):
                c.k[L][0] = out[n.new_key][i, :, : c.n]
                c.v[L][0] = out[n.new_value][i, :, : c.n]
                c.q[L][0] = out[n.new_queries][i, :, : c.n]
            target = c.boundary[r + 1] if r + 1 < len(self.ranges) else c.final
            target[0] = out["hidden_states_out"][i, : c.n]
            c.current = target
            stats.append(RangeStats(colsum=np.stack([out[n.colsum][i, : c.n] for n in names])))
        return stats

    def _head_many(self, canvases, rows):
        # only the rows to decode are handed over, so that sequences in window mode and refreshed ones (whose
        # hidden states span the canvas) pad to a few rows each
        hidden = _padded([c.current[0][r] for c, r in zip(canvases, rows)], 0.0)
        picked = _padded([np.arange(len(r), dtype=np.int64) for r in rows], -1)
        out = self._run("head", {"hidden_states": hidden, "rows": picked}, {}, [], ["tokens", "probs"])
        return [(out["tokens"][i, : len(r)], out["probs"][i, : len(r)]) for i, r in enumerate(rows)]

    def _stacked(self, caches: list, length: int, name: str) -> np.ndarray:
        """The sequences' caches [1, H, n_i, hd] (or [H, t_i, hd] rows) in one [B, H, length, hd] buffer, kept per
        input name and reused while the shape holds (slots past a sequence's canvas keep whatever they held:
        nothing reads them)."""
        first = caches[0]
        heads, dim = first.shape[-3], first.shape[-1]
        out = self._scratch(name, (len(caches), heads, length, dim))
        for i, cache in enumerate(caches):
            cache = cache[0] if cache.ndim == 4 else cache
            out[i, :, : cache.shape[1]] = cache
        return out

    def _scratch(self, name: str, shape: tuple) -> np.ndarray:
        """A [shape] view at the start of one flat buffer per name, grown (never shrunk) as batches need: group
        sizes and canvas lengths change from step to step, the buffer is allocated a few times per process."""
        size = int(np.prod(shape))
        flat = self._scratches.get(name)
        if flat is None or flat.size < size:
            flat = self._scratches[name] = np.zeros(size, self.arrays.dtype)
        return flat[:size].reshape(shape)


def _padded(rows: list, fill, length: int | None = None) -> np.ndarray:
    """Arrays of one sequence each ([n_i] or [n_i, D]) as one [B, longest, ...] array, filled after each."""
    length = max(len(r) for r in rows) if length is None else length
    first = np.asarray(rows[0])
    out = np.full((len(rows), length, *first.shape[1:]), fill, dtype=first.dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclass
class OrtCanvas:
    """One sequence's buffers: per layer key, value, query caches [1, H, n, hd]; the hidden states entering each
    range and after the last one [1, n, D]; what refresh passes bind."""
    n: int
    k: list
    v: list
    q: list
    boundary: list
    final: object
    positions: np.ndarray
    canvas_lengths: np.ndarray
    unread_cache: object
    no_track_queries: object
    filled: bool = False   # device caches start uninitialised; the first full refresh of a generation fills them
    current: object = None  # the hidden rows the next window pass or the head reads

    def buffers(self) -> list:
        return [*self.k, *self.v, *self.q, *self.boundary, self.final, self.unread_cache, self.no_track_queries]
