"""The PyTorch backend: runs the reference pieces eagerly (CPU, or CUDA when present) with device-resident caches.

With buckets=True a window step runs as one fixed-shape program per shape bucket (runtime/buckets.py): the
embedding, every range's window pass, the head on the window rows and one copy of all statistics, with inputs
uploaded in one copy; refresh passes run at the canvas shape. With graphs=True (CUDA) each such program is
captured once as a CUDA graph and replayed; on CPU the same programs run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import buckets as bk
from .. import memory
from ..config import layer_ranges
from .base import Backend, BackendError, RangeStats, split_stats, stat_tensors

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchBackend(Backend):
    name = "torch"
    MAX_CANVASES = 8  # padded mode: canvas lengths whose buffers (and programs) are kept

    def __init__(self, model_dir, layers_per_range: int = 1, device: str | None = None, dtype: str = "fp32",
                 buckets: bool = False, graphs: bool = False, fast: bool | None = None):
        """buckets: padded fixed-shape window steps; graphs: also CUDA graphs (implies buckets; eager on CPU);
        fast: fused QKV + scaled_dot_product_attention (default: on with graphs)."""
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install 'dllm-trt[export]'") from None
        from ..checkpoint import Checkpoint
        from ..model_torch import Embedding, Head, LayerRange

        if dtype not in _DTYPES:
            raise BackendError(f"unknown dtype {dtype!r} (choose {', '.join(_DTYPES)})")
        self.torch = torch
        self.device = _device(torch, device)
        self.bucketed = buckets or graphs
        self.graphs = graphs and self.device.type == "cuda"
        self.fast = graphs if fast is None else fast
        self.one_sync_per_step = self.device.type == "cuda" or self.bucketed
        self.dtype = getattr(torch, _DTYPES[dtype])
        torch.set_grad_enabled(False)
        if model_dir is None:  # filled in by random()
            return
        ckpt = Checkpoint(model_dir)
        self.config = ckpt.config
        self.ranges = layer_ranges(self.config.n_layers, layers_per_range)
        self.embedding = Embedding(self.config, self.dtype).load(ckpt).to(self.device).eval()
        self.layers = [LayerRange(self.config, a, b, self.dtype).load(ckpt).to(self.device).eval()
                       for a, b in self.ranges]
        self.head_piece = Head(self.config, self.dtype).load(ckpt).to(self.device).eval()
        self._freeze()

    @classmethod
    def random(cls, config, layers_per_range: int = 1, device: str | None = None, dtype: str = "bf16",
               seed: int = 0, **options) -> "TorchBackend":
        """Random weights made directly on the device: for timing model shapes (e.g. LLaDA-8B) with no checkpoint."""
        from ..model_torch import Embedding, Head, LayerRange

        self = cls(None, layers_per_range, device, dtype, **options)
        torch = self.torch
        torch.manual_seed(seed)
        self.config = config
        self.ranges = layer_ranges(config.n_layers, layers_per_range)
        with torch.device(self.device):
            self.embedding = Embedding(config, self.dtype)
            self.layers = [LayerRange(config, a, b, self.dtype) for a, b in self.ranges]
            self.head_piece = Head(config, self.dtype)
        for module in [self.embedding, self.head_piece, *self.layers]:
            for p in module.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
        self._freeze()
        return self

    def _freeze(self) -> None:
        # Grad mode is per thread (set_grad_enabled above only covers this one); frozen weights keep decodings
        # run from other threads (Engine.stream, the server) free of autograd bookkeeping.
        for module in [self.embedding, self.head_piece, *self.layers]:
            module.requires_grad_(False)
        if self.fast:
            for layers in self.layers:
                layers.make_fast()
        self.sizes = bk.bucket_sizes(self.config.max_sequence_length)
        self.programs: dict = {}      # StepShape or (range, canvas, window bucket) -> _Program
        self.captures = 0             # CUDA graphs captured (0 on CPU)
        self.last_shape = None        # the StepShape of the latest window step
        self._pool = self.torch.cuda.graph_pool_handle() if self.graphs else None
        self._canvases: dict = {}     # canvas length -> its caches and boundaries (padded mode)

    def describe(self) -> str:
        extra = ", graphs" if self.graphs else ", buckets" if self.bucketed else ""
        return f"torch ({self.device.type}, {str(self.dtype).removeprefix('torch.')}{extra})"

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _allocate(self, n: int) -> None:
        self._check_room(n)
        if self.bucketed:
            return self._allocate_padded(n)
        c, t = self.config, self.torch
        shape = (c.n_heads, n, c.head_dim)
        self.k = [t.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layers)]
        self.v = [t.zeros_like(x) for x in self.k]
        self.q = [t.zeros_like(x) for x in self.k]
        self.boundary = [t.zeros((n, c.d_model), dtype=self.dtype, device=self.device) for _ in self.ranges]
        self.positions = t.arange(n, device=self.device)

    def _check_room(self, n: int) -> None:
        """Refuse a canvas whose caches cannot fit (one line naming the sizes) before torch tries: a checkpoint may
        declare a million positions, and torch's own answer is an allocation traceback."""
        t = self.torch
        dtype = {t.float32: "fp32", t.float16: "fp16", t.bfloat16: "bf16"}[self.dtype]
        free = t.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        memory.require_memory(memory.canvas_bytes(self.config, dtype, len(self.ranges), n),
                              f"a canvas of {n} positions", "ask for fewer positions (--gen-length, max_tokens)", free)

    def _store(self, r: int, positions, hidden) -> None:
        """Keep `hidden` as the current rows and as the input of range r (if it exists)."""
        self.current = hidden
        if r < len(self.ranges):
            if positions is None:
                self.boundary[r].copy_(hidden)
            else:
                self.boundary[r].index_copy_(0, self._t(positions), hidden)

    def _embed(self, ids, positions):
        if self.bucketed:
            return self._embed_padded(ids, positions)
        self._store(0, positions, self.embedding(self._t(ids)))

    def _window(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        if self.bucketed:
            return self._window_padded(r, positions, track_rows, track_positions, window_rows, key_is_mask)
        a, b = self.ranges[r]
        pos, track = self._t(positions), self._t(track_positions)
        caches = []
        for layer in range(a, b):
            caches += [self.k[layer], self.v[layer], self.q[layer].index_select(1, track)]
        out = self.layers[r].window(self.current, pos, self._t(track_rows), self._t(window_rows),
                                    self._t(key_is_mask), *caches)
        drift, colsum = [], []
        for i, layer in enumerate(range(a, b)):
            k, v, q, d, c = out[1 + 5 * i: 6 + 5 * i]
            self.k[layer].index_copy_(1, pos, k)
            self.v[layer].index_copy_(1, pos, v)
            self.q[layer].index_copy_(1, pos, q)
            drift.append(d)
            colsum.append(c)
        self._store(r + 1, positions, out[0])
        return RangeStats(colsum=self.torch.stack(colsum), drift=self.torch.stack(drift))

    def _refresh(self, r, window_positions, key_is_mask):
        if self.bucketed:
            return self._refresh_padded(r, window_positions, key_is_mask)
        a, b = self.ranges[r]
        out = self.layers[r].refresh(self.boundary[r], self.positions, self._t(window_positions),
                                     self._t(key_is_mask))
        colsum = []
        for i, layer in enumerate(range(a, b)):
            k, v, q, c = out[1 + 4 * i: 5 + 4 * i]
            self.k[layer].copy_(k)
            self.v[layer].copy_(v)
            self.q[layer].copy_(q)
            colsum.append(c)
        self._store(r + 1, None, out[0])
        return RangeStats(colsum=self.torch.stack(colsum))

    def fetch(self, stats):
        """Pass and piece outputs stay on the device; all statistics of a step come back in one copy (a padded
        window step made its own copy: its statistics are taken from there)."""
        if any(st.pending is not None for st in stats):
            self._finish_step()
            stats = [self._step_stats[st.pending] if st.pending is not None else st for st in stats]
        on_device = [st for st in stats if isinstance(st.colsum, self.torch.Tensor)]
        if not on_device:
            return stats
        flat = self.torch.cat([t.reshape(-1).float() for t in stat_tensors(on_device)]).cpu().numpy()
        host = dict(zip(map(id, on_device), split_stats(on_device, flat)))
        return [host.get(id(st), st) for st in stats]

    def head(self, targets):
        if self.bucketed and self._rows is not None:  # no refresh since the window step: its head ran in it
            self._finish_step()
            if not np.array_equal(np.asarray(targets, dtype=np.int64), self._step_args[4]):
                raise ValueError("a padded window step computes the head on its window rows only")
            return self._step_head
        return super().head(targets)

    def _head(self, rows):
        tokens, probs = self.head_piece(self.current, self._t(rows))
        return tokens.cpu().numpy(), probs.float().cpu().numpy()


    # ---- padded, fixed-shape steps (buckets / CUDA graphs) ----------------------------------------------------
    # Caches hold one extra "scratch" slot (index n) that no real row attends to; pad query rows live there.

    def _allocate_padded(self, n: int) -> None:
        """Buffers per canvas length, kept for the next generations of that length (their programs hold the
        buffers' addresses); the least recently used length is dropped beyond MAX_CANVASES."""
        c, t = self.config, self.torch
        buffers = self._canvases.pop(n, None)
        if buffers is None:
            shape = (c.n_heads, n + 1, c.head_dim)
            k = [t.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layers)]
            buffers = dict(k=k, v=[t.zeros_like(x) for x in k], q=[t.zeros_like(x) for x in k],
                           boundary=[t.zeros((n + 1, c.d_model), dtype=self.dtype, device=self.device)
                                     for _ in range(len(self.ranges) + 1)],
                           positions=t.arange(n, device=self.device),
                           key_valid=t.arange(n + 1, device=self.device) < n)
        else:  # a new generation on a known canvas length: same addresses, fresh contents
            for x in [*buffers["k"], *buffers["v"], *buffers["q"], *buffers["boundary"]]:
                x.zero_()
        self._canvases[n] = buffers
        while len(self._canvases) > self.MAX_CANVASES:
            old = next(iter(self._canvases))
            del self._canvases[old]
            self.programs = {key: p for key, p in self.programs.items() if _canvas_of(key) != old}
        for name, value in buffers.items():
            setattr(self, name, value)
        self._step_args = self._step_ids = None

    def _embed_padded(self, ids, positions):
        self._step_args, self._step_stats, self._step_head = None, None, None
        if positions is None:
            self.boundary[0][: self.n_positions].copy_(self.embedding(self._t(ids)))
        else:
            self._step_ids = ids

    def _window_padded(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        """Only records the step; the whole step (every range) runs at the first fetch or head."""
        args = (positions, track_rows, track_positions, window_rows, positions[window_rows], key_is_mask)
        if self._step_args is None:
            self._step_args = args
        elif not all(np.array_equal(x, y) for x, y in zip(args, self._step_args)):
            raise ValueError("every range of a padded window step must get the same rows")
        return RangeStats(colsum=None, pending=r)

    def _finish_step(self) -> None:
        """Run the recorded window step once (upload, program, one copy back), then split its statistics."""
        if self._step_stats is not None:
            return
        positions, track_rows, track_positions, window_rows, _, key_is_mask = self._step_args
        n = self.n_positions
        shape = bk.step_shape(n, len(positions), len(track_rows), len(window_rows), self.sizes)
        self.last_shape = shape
        prog = self.programs.get(shape) or self._build_window_program(shape)
        ids, qv = bk.pad(self._step_ids, shape.queries, self.config.mask_token_id)
        pos, _ = bk.pad(positions, shape.queries, n)
        trows, tv = bk.pad(track_rows, shape.tracked, 0)
        tpos, _ = bk.pad(track_positions, shape.tracked, n)
        wrows, wv = bk.pad(window_rows, shape.window, 0)
        kmask = np.append(np.asarray(key_is_mask, dtype=np.int64), 1)
        prog.run(np.concatenate([ids, pos, trows, tpos, wrows, qv, tv, wv, kmask]))
        flat = prog.host.float().numpy()
        stats, at = [], 0
        for a, b in self.ranges:
            m = b - a
            drift = flat[at: at + 2 * m].reshape(m, 2)
            colsum = flat[at + 2 * m: at + 2 * m + m * n].reshape(m, n)
            stats.append(RangeStats(colsum=colsum.copy(), drift=drift.copy()))
            at += 2 * m + m * n
        w = len(window_rows)
        self._step_stats = stats
        self._step_head = (flat[at: at + w].astype(np.int64), flat[at + shape.window: at + shape.window + w].copy())

    def _build_window_program(self, shape) -> "_Program":
        n, t = shape.canvas, self.torch
        sizes = [shape.queries] * 2 + [shape.tracked] * 2 + [shape.window] + \
                [shape.queries, shape.tracked, shape.window, n + 1]
        out_len = sum((b - a) * (2 + n) for a, b in self.ranges) + 2 * shape.window
        prog = self._program(sum(sizes), out_len)

        def step():
            ids, pos, trows, tpos, wrows, qv, tv, wv, kmask = prog.device_in.split(sizes)
            qv, tv, wv, kmask = qv.bool(), tv.bool(), wv.bool(), kmask.bool()
            hidden = self.embedding(ids)
            self.boundary[0].index_copy_(0, pos, hidden)
            parts = []
            for r, (a, b) in enumerate(self.ranges):
                caches = []
                for layer in range(a, b):
                    caches += [self.k[layer], self.v[layer], self.q[layer].index_select(1, tpos)]
                out = self.layers[r].window(hidden, pos, trows, wrows, kmask, *caches, query_valid=qv,
                                            key_valid=self.key_valid, track_valid=tv, window_valid=wv)
                for i, layer in enumerate(range(a, b)):
                    k, v, q, drift, colsum = out[1 + 5 * i: 6 + 5 * i]
                    self.k[layer].index_copy_(1, pos, k)
                    self.v[layer].index_copy_(1, pos, v)
                    self.q[layer].index_copy_(1, pos, q)
                    parts += [drift]
                parts += [out[5 + 5 * i][:n] for i in range(b - a)]
                hidden = out[0]
                self.boundary[r + 1].index_copy_(0, pos, hidden)
            tokens, probs = self.head_piece(hidden, wrows)
            flat = t.cat([x.reshape(-1).float() for x in parts] + [tokens.float(), probs.float()])
            prog.host.copy_(flat, non_blocking=True)

        # Capture with inert inputs: every row a pad row in the scratch slot, so warm-up writes nothing real.
        inert = np.concatenate([np.full(shape.queries, self.config.mask_token_id), np.full(shape.queries, n),
                                np.zeros(shape.tracked), np.full(shape.tracked, n), np.zeros(shape.window),
                                np.zeros(shape.queries + shape.tracked + shape.window), np.ones(n + 1)])
        prog.upload(inert.astype(np.int64))
        prog.set(step, self._capture(step))
        self.programs[shape] = prog
        return prog

    def _refresh_padded(self, r, window_positions, key_is_mask):
        n = self.n_positions
        w = bk.bucket_for(max(len(window_positions), 1), self.sizes)
        key = (r, n, w)
        prog = self.programs.get(key) or self._build_refresh_program(r, n, w)
        wrows, wv = bk.pad(window_positions, w, 0)
        prog.run(np.concatenate([wrows, wv, np.asarray(key_is_mask, dtype=np.int64)]), sync=False)
        self.current = self.boundary[r + 1][:n]
        return RangeStats(colsum=prog.device_out.view(self.ranges[r][1] - self.ranges[r][0], n))

    def _build_refresh_program(self, r, n, w) -> "_Program":
        a, b = self.ranges[r]
        sizes = [w, w, n]
        prog = self._program(sum(sizes), 0, device_out=(b - a) * n)

        def step():
            wrows, wv, kmask = prog.device_in.split(sizes)
            out = self.layers[r].refresh(self.boundary[r][:n], self.positions, wrows, kmask.bool(),
                                         window_valid=wv.bool())
            for i, layer in enumerate(range(a, b)):
                k, v, q, colsum = out[1 + 4 * i: 5 + 4 * i]
                self.k[layer][:, :n].copy_(k)
                self.v[layer][:, :n].copy_(v)
                self.q[layer][:, :n].copy_(q)
                prog.device_out[i * n: (i + 1) * n].copy_(colsum)
            self.boundary[r + 1][:n].copy_(out[0])

        prog.set(step, None)
        self.programs[(r, n, w)] = prog
        prog.capture_on_first_run = self._capture  # refresh is idempotent: warming up on real inputs is harmless
        return prog

    def _program(self, n_in: int, n_out: int, device_out: int = 0) -> "_Program":
        t, pin = self.torch, self.device.type == "cuda"
        return _Program(staging=t.zeros(n_in, dtype=t.int64, pin_memory=pin),
                        device_in=t.zeros(n_in, dtype=t.int64, device=self.device),
                        host=t.zeros(n_out, dtype=t.float32, pin_memory=pin),
                        device_out=t.zeros(device_out, dtype=t.float32, device=self.device),
                        sync=self._sync)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.current_stream().synchronize()

    def _capture(self, fn):
        """A CUDA graph of fn, replayed by the returned callable; None on CPU (fn then runs eagerly)."""
        if not self.graphs:
            return None
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up outside the capture: lazy initialisation, library workspaces
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        self.captures += 1
        self._graphs = getattr(self, "_graphs", []) + [graph]  # the graphs must outlive their replays
        return graph.replay


def _canvas_of(key) -> int:
    return key.canvas if isinstance(key, bk.StepShape) else key[1]


@dataclass
class _Program:
    """One fixed-shape computation: its static input buffers (host staging -> device), its outputs (a host buffer
    that the step copies into, and/or a device buffer), and how to run it (a graph replay, or eagerly)."""
    staging: object
    device_in: object
    host: object
    device_out: object
    sync: object
    fn: object = None
    replay: object = None
    capture_on_first_run: object = None
    runs: int = 0
    _uploaded: np.ndarray | None = None

    def set(self, fn, replay) -> None:
        self.fn, self.replay = fn, replay

    def upload(self, values: np.ndarray) -> None:
        # Skipped when unchanged (the refresh passes of one step share inputs). Changed values come only after a
        # host sync (each step's fetch), so the staging buffer is never rewritten under a queued copy from it.
        if self._uploaded is not None and np.array_equal(values, self._uploaded):
            return
        self.staging.copy_(torch_from_numpy(values))
        self.device_in.copy_(self.staging, non_blocking=True)
        self._uploaded = values.copy()

    def run(self, values: np.ndarray, sync: bool = True) -> None:
        self.upload(values)
        if self.replay is None and self.capture_on_first_run is not None:
            self.fn()  # the first run is eager; the capture's warm-up repeats it (idempotent)
            self.replay = self.capture_on_first_run(self.fn)
            self.capture_on_first_run = None
        else:
            (self.replay or self.fn)()
        self.runs += 1
        if sync:
            self.sync()


def torch_from_numpy(values: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))


def _device(torch, name: str | None):
    """cpu or cuda[:N] (default: cuda when present), or one BackendError line."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise BackendError(f"unknown device {name!r} (choose cpu or cuda, e.g. cuda:0)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {name!r}: CUDA is not available here (no GPU, or a CPU-only torch build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device
