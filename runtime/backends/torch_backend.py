"""The PyTorch backend: runs the reference pieces (CPU, or CUDA when present) with device-resident caches.

Two classes, chosen once at load:
- TorchBackend runs each piece eagerly at the step's own shapes (the reference).
- PaddedTorchBackend runs a window step as one fixed-shape program per shape bucket (runtime/buckets.py): the
  embedding, every range's window pass, the head on the window rows and one copy of all statistics, with inputs
  uploaded in one copy; refresh passes run at the canvas shape. With graphs=True (CUDA) each such program is
  captured once as a CUDA graph and replayed; on CPU the same programs run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .. import buckets as bk
from .. import memory
from ..config import ModelConfig, layer_ranges
from .base import Backend, BackendError, RangeStats, split_stats, stat_tensors

@dataclass(frozen=True)
class RandomWeights:
    """Stands for a checkpoint: weights drawn on the device (for timing model shapes, e.g. LLaDA-8B)."""
    config: ModelConfig
    seed: int = 0


class _TorchBase(Backend):
    """What both torch backends share: the pieces on the device, the caches of the current canvas, the head,
    and bringing statistics back in one copy."""

    name = "torch"

    def __init__(self, model_dir: str | Path | RandomWeights, layers_per_range: int = 1, device: str | None = None,
                 dtype: str = "fp32", fast: bool = False):
        """fast: fused QKV + scaled_dot_product_attention."""
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install 'dllm-trt[export]'") from None

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise BackendError(f"unknown dtype {dtype!r} (choose {', '.join(dtypes)})")
        self.torch = torch
        self.device = _device(torch, device)
        self.fast = fast
        self.dtype_name = self.activation_dtype = dtype
        self.dtype = dtypes[dtype]
        torch.set_grad_enabled(False)
        if isinstance(model_dir, RandomWeights):
            self._make_random(model_dir, layers_per_range)
        else:
            self._load(model_dir, layers_per_range)
        # Grad mode is per thread (set_grad_enabled above only covers this one); frozen weights keep decodings
        # run from other threads (Engine.stream, the server) free of autograd bookkeeping.
        for module in [self.embedding, self.head_piece, *self.layers]:
            module.requires_grad_(False)
        if fast:
            for layers in self.layers:
                layers.make_fast()
        self.caches: Caches | None = None  # the current canvas's
        self.current = None                # the hidden rows the next window pass or the head reads

    @classmethod
    def random(cls, config: ModelConfig, layers_per_range: int = 1, device: str | None = None, dtype: str = "bf16",
               seed: int = 0, **options):
        """Random weights made directly on the device: for timing model shapes (e.g. LLaDA-8B) with no checkpoint."""
        return cls(RandomWeights(config, seed), layers_per_range, device, dtype, **options)

    def _load(self, model_dir, layers_per_range: int) -> None:
        from ..checkpoint import Checkpoint
        from ..model_torch import Embedding, Head, LayerRange

        ckpt = Checkpoint(model_dir)
        self.config = ckpt.config
        self.ranges = layer_ranges(self.config.n_layers, layers_per_range)
        self.embedding = Embedding(self.config, self.dtype).load(ckpt).to(self.device).eval()
        self.layers = [LayerRange(self.config, a, b, self.dtype).load(ckpt).to(self.device).eval()
                       for a, b in self.ranges]
        self.head_piece = Head(self.config, self.dtype).load(ckpt).to(self.device).eval()

    def _make_random(self, weights: RandomWeights, layers_per_range: int) -> None:
        from ..model_torch import Embedding, Head, LayerRange

        torch = self.torch
        torch.manual_seed(weights.seed)
        self.config = weights.config
        self.ranges = layer_ranges(self.config.n_layers, layers_per_range)
        with torch.device(self.device):
            self.embedding = Embedding(self.config, self.dtype)
            self.layers = [LayerRange(self.config, a, b, self.dtype) for a, b in self.ranges]
            self.head_piece = Head(self.config, self.dtype)
        for module in [self.embedding, self.head_piece, *self.layers]:
            for p in module.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)

    # The caches under the names every backend gives them (tests compare backends through these).
    k = property(lambda self: self.caches.k)
    v = property(lambda self: self.caches.v)
    q = property(lambda self: self.caches.q)
    boundary = property(lambda self: self.caches.boundary)

    def describe(self) -> str:
        return f"torch ({self.device.type}, {str(self.dtype).removeprefix('torch.')}{self._describe_mode()})"

    def _describe_mode(self) -> str:
        return ""

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _allocate(self, n: int) -> "Caches":
        self._check_room(n)
        return self._caches_for(n)

    def _use(self, caches: "Caches") -> None:
        self.caches = caches

    def _caches_for(self, n: int) -> "Caches":
        raise NotImplementedError

    def free_cache_memory(self) -> int | None:
        if self.device.type == "cuda":
            return int(self.torch.cuda.mem_get_info(self.device)[0])
        return super().free_cache_memory()

    def _check_room(self, n: int) -> None:
        """Refuse a canvas whose caches cannot fit (one line naming the sizes) before torch tries: a checkpoint may
        declare a million positions, and torch's own answer is an allocation traceback."""
        t = self.torch
        free = t.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        memory.require_memory(memory.canvas_bytes(self.config, self.dtype_name, len(self.ranges), n),
                              f"a canvas of {n} positions", "ask for fewer positions (--gen-length, max_tokens)", free)

    def fetch(self, stats):
        """Pass and piece outputs stay on the device; all statistics of a step come back in one copy."""
        on_device = [st for st in stats if isinstance(st.colsum, self.torch.Tensor)]
        if not on_device:
            return stats
        flat = self.torch.cat([t.reshape(-1).float() for t in stat_tensors(on_device)]).cpu().numpy()
        host = dict(zip(map(id, on_device), split_stats(on_device, flat)))
        return [host.get(id(st), st) for st in stats]

    def _head(self, rows):
        tokens, probs = self.head_piece(self.current, self._t(rows))
        return tokens.cpu().numpy(), probs.float().cpu().numpy()


class TorchBackend(_TorchBase):
    """The reference: every piece runs eagerly at the step's own shapes.

    max_batch > 1: several sequences go through one call of each piece, as the exported graphs do
    (LayerRange.forward on inputs padded to the longest canvas and row count); one sequence at a time still runs the
    reference passes (LayerRange.window / refresh). Off by default: this backend is the reference."""

    def __init__(self, model_dir: str | Path | RandomWeights, layers_per_range: int = 1, device: str | None = None,
                 dtype: str = "fp32", fast: bool = False, max_batch: int = 1):
        self._rows_now: dict[int, Any] = {}   # id(caches) -> that sequence's current hidden rows (see current)
        super().__init__(model_dir, layers_per_range, device, dtype, fast)
        self.one_sync_per_step = self.device.type == "cuda"
        if max_batch < 1:
            raise BackendError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch

    # The hidden rows the next pass or the head reads are kept per sequence (by its caches): a step may run its
    # embedding for several sequences in one call and a later range for one of them alone.
    @property
    def current(self):
        return self._rows_now.get(id(self.caches))

    @current.setter
    def current(self, hidden) -> None:
        self._rows_now[id(self.caches)] = hidden

    def _release(self, caches) -> None:
        self._rows_now.pop(id(caches), None)

    def _caches_for(self, n: int) -> "Caches":
        return Caches.zeros(self.config, n, scratch_slots=0, n_boundaries=len(self.ranges), dtype=self.dtype,
                            device=self.device)

    def _store(self, r: int, positions, hidden) -> None:
        """Keep `hidden` as the current rows and as the input of range r (if it exists); positions: a device
        tensor of canvas slots, or None for the whole canvas."""
        self.current = hidden
        if r < len(self.ranges):
            if positions is None:
                self.caches.boundary[r].copy_(hidden)
            else:
                self.caches.boundary[r].index_copy_(0, positions, hidden)

    def _embed(self, ids, positions):
        self._store(0, None if positions is None else self._t(positions), self.embedding(self._t(ids)))

    def _window(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        first, last = self.ranges[r]
        pos = self._t(positions)
        out = self.layers[r].window(self.current, pos, self._t(track_rows), self._t(window_rows),
                                    self._t(key_is_mask),
                                    *self.caches.window_inputs(first, last, self._t(track_positions)))
        hidden, per_layer = _split_layers(out, WindowOut)
        for layer, new in zip(range(first, last), per_layer):
            self.caches.put_rows(layer, pos, new)
        self._store(r + 1, pos, hidden)
        return RangeStats(colsum=self.torch.stack([x.colsum for x in per_layer]),
                          drift=self.torch.stack([x.drift for x in per_layer]))

    def _refresh(self, r, window_positions, key_is_mask):
        first, last = self.ranges[r]
        out = self.layers[r].refresh(self.caches.boundary[r], self.caches.positions, self._t(window_positions),
                                     self._t(key_is_mask))
        hidden, per_layer = _split_layers(out, RefreshOut)
        n = self.n_positions
        for layer, new in zip(range(first, last), per_layer):
            self.caches.put_all(layer, n, new)
        self._store(r + 1, None, hidden)
        return RangeStats(colsum=self.torch.stack([x.colsum for x in per_layer]))

    # ---- several sequences per call (max_batch > 1): padded as the contract says, caches stacked per call ------
    def _padded(self, rows: list, fill, length: int | None = None):
        return padded_rows(self.torch, self.device, rows, fill, length)

    def _stacked(self, caches: list, length: int):
        return stacked_caches(self.torch, caches, length)

    def _embed_many(self, caches, ids, positions):
        hidden = self.embedding(self._padded(ids, 0))
        for i, (c, p) in enumerate(zip(caches, positions)):
            n = len(c.positions)
            if p is None:
                c.boundary[0].copy_(hidden[i, :n])
                self._rows_now[id(c)] = c.boundary[0]
            else:
                c.boundary[0].index_copy_(0, self._t(p), hidden[i, : len(p)])
                self._rows_now[id(c)] = hidden[i, : len(p)]

    def _window_many(self, r, caches, positions, track_rows, track_positions, window_rows, key_is_mask):
        first, last = self.ranges[r]
        lengths = [len(c.positions) for c in caches]
        longest, n_track = max(lengths), max(len(t) for t in track_positions)
        inputs = [self._padded([self._rows_now[id(c)] for c in caches], 0.0), self._padded(positions, -1),
                  self._t(np.array(lengths, dtype=np.int64)), self._padded(key_is_mask, True, longest), self._padded(track_rows, -1),
                  self._padded(window_rows, -1)]
        for layer in range(first, last):
            inputs += [self._stacked([c.k[layer] for c in caches], longest),
                       self._stacked([c.v[layer] for c in caches], longest),
                       self._stacked([c.q[layer][:, self._t(t)] for c, t in zip(caches, track_positions)], n_track)]
        hidden, *per_layer = self.layers[r].forward(*inputs)
        outs = [per_layer[i: i + 5] for i in range(0, len(per_layer), 5)]   # key, value, query, drift, colsum
        stats = []
        for i, (c, p) in enumerate(zip(caches, positions)):
            pos, rows = self._t(p), len(p)
            for layer, (k, v, q, _, _) in zip(range(first, last), outs):
                c.put_rows(layer, pos, WindowOut(k[i, :, :rows], v[i, :, :rows], q[i, :, :rows], None, None))
            if r + 1 < len(self.ranges):
                c.boundary[r + 1].index_copy_(0, pos, hidden[i, :rows])
            self._rows_now[id(c)] = hidden[i, :rows]
            stats.append(RangeStats(colsum=self.torch.stack([o[4][i, : lengths[i]] for o in outs]),
                                    drift=self.torch.stack([o[3][i] for o in outs])))
        return stats

    def _refresh_many(self, r, caches, window_positions, key_is_mask):
        first, last = self.ranges[r]
        lengths = [len(c.positions) for c in caches]
        batch, longest, cfg = len(caches), max(lengths), self.config
        unread = self.torch.zeros((batch, cfg.n_heads, longest, cfg.head_dim), dtype=self.dtype, device=self.device)
        no_track = unread[:, :, :1]
        inputs = [self._padded([c.boundary[r] for c in caches], 0.0), self._padded([c.positions for c in caches], -1),
                  self._t(np.array(lengths, dtype=np.int64)), self._padded(key_is_mask, True),
                  self.torch.zeros((batch, 1), dtype=self.torch.int64, device=self.device),
                  self._padded(window_positions, -1)]
        inputs += [unread, unread, no_track] * (last - first)
        hidden, *per_layer = self.layers[r].forward(*inputs)
        outs = [per_layer[i: i + 5] for i in range(0, len(per_layer), 5)]
        stats = []
        for i, c in enumerate(caches):
            n = lengths[i]
            for layer, (k, v, q, _, _) in zip(range(first, last), outs):
                c.put_all(layer, n, RefreshOut(k[i, :, :n], v[i, :, :n], q[i, :, :n], None))
            if r + 1 < len(self.ranges):
                c.boundary[r + 1].copy_(hidden[i, :n])
            self._rows_now[id(c)] = hidden[i, :n]
            stats.append(RangeStats(colsum=self.torch.stack([o[4][i, :n] for o in outs])))
        return stats

    def _head_many(self, caches, rows):
        # only the rows to decode are handed over, as the ONNX Runtime backend does
        hidden = self._padded([self._rows_now[id(c)][self._t(r)] for c, r in zip(caches, rows)], 0.0)
        picked = self._padded([np.arange(len(r)) for r in rows], -1)
        tokens, probs = self.head_piece(hidden, picked)
        tokens, probs = tokens.cpu().numpy(), probs.float().cpu().numpy()
        return [(tokens[i, : len(r)], probs[i, : len(r)]) for i, r in enumerate(rows)]


class PaddedTorchBackend(_TorchBase):
    """Fixed-shape steps: a window step is recorded range by range and runs whole, as one program per shape bucket,
    at the first fetch or head; a refresh pass runs as one program per (range, canvas, window bucket). With
    graphs=True on CUDA each program is a CUDA graph; elsewhere the programs run eagerly.

    Caches hold one extra "scratch" slot (index n) that no real row attends to; pad query rows live there."""

    MAX_CANVASES = 8  # canvas lengths whose buffers (and programs) are kept
    one_sync_per_step = True

    def __init__(self, model_dir: str | Path | RandomWeights, layers_per_range: int = 1, device: str | None = None,
                 dtype: str = "fp32", graphs: bool = False, fast: bool | None = None):
        """graphs: CUDA graphs (eager on CPU); fast: fused QKV + scaled_dot_product_attention (default: on with
        graphs)."""
        super().__init__(model_dir, layers_per_range, device, dtype, graphs if fast is None else fast)
        self.graphs = graphs and self.device.type == "cuda"
        self.sizes = bk.bucket_sizes(self.config.max_sequence_length)
        self.programs: dict[bk.StepShape | RefreshShape, _Program] = {}
        self.captures = 0                          # CUDA graphs captured (0 on CPU)
        self.last_shape: bk.StepShape | None = None  # the shape of the latest window step
        self._pool = self.torch.cuda.graph_pool_handle() if self.graphs else None
        self._graphs: list = []                    # the captured graphs must outlive their replays
        self._canvases: dict[int, Caches] = {}     # canvas length -> its caches, least recently used first
        self._step: _WindowStep | None = None      # the window step being recorded (after a partial embed)
        self._open: set[int] = set()               # canvas lengths of the sequences open now

    def _release(self, caches: "Caches") -> None:
        self._open.discard(len(caches.positions))

    def _describe_mode(self) -> str:
        return ", graphs" if self.graphs else ", buckets"

    def _allocate(self, n: int) -> "Caches":
        self._step = None
        return super()._allocate(n)

    def _caches_for(self, n: int) -> "Caches":
        """Caches per canvas length, kept for the next generations of that length (their programs hold the
        caches' addresses); the least recently used length is dropped beyond MAX_CANVASES, with its programs.
        One sequence per canvas length may be open at a time (its programs hold those addresses)."""
        if n in self._open:
            raise BackendError(f"a sequence of {n} positions is already open: the bucketed torch backend decodes one "
                               f"sequence per canvas length at a time")
        self._open.add(n)
        caches = self._canvases.pop(n, None)
        if caches is None:
            caches = Caches.zeros(self.config, n, scratch_slots=1, n_boundaries=len(self.ranges) + 1,
                                  dtype=self.dtype, device=self.device)
        else:  # a new generation on a known canvas length: same addresses, fresh contents
            caches.zero_()
        self._canvases[n] = caches
        while len(self._canvases) > self.MAX_CANVASES:
            old = next(iter(self._canvases))
            del self._canvases[old]
            self.programs = {key: p for key, p in self.programs.items() if key.canvas != old}
        return caches

    # ---- the interface: a window step is recorded, then run whole ------------------------------------------------
    def _embed(self, ids, positions):
        if positions is None:
            self._step = None
            self.caches.boundary[0][: self.n_positions].copy_(self.embedding(self._t(ids)))
        else:
            self._step = _WindowStep(ids)

    def _window(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        """Only records the step; the whole step (every range) runs at the first fetch or head."""
        rows = _StepRows(positions, track_rows, track_positions, window_rows, positions[window_rows], key_is_mask)
        if self._step.rows is None:
            self._step.rows = rows
        elif not rows.same_as(self._step.rows):
            raise ValueError("every range of a padded window step must get the same rows")
        return RangeStats(colsum=None, pending=r)

    def fetch(self, stats):
        """A window step's statistics come from its own single copy; refresh statistics as in the plain backend."""
        if any(st.pending is not None for st in stats):
            step_stats = self._run_step().stats
            stats = [step_stats[st.pending] if st.pending is not None else st for st in stats]
        return super().fetch(stats)

    def head(self, targets):
        if self._rows is None:  # after a refresh (or a whole-canvas embed): the head runs on its own
            return super().head(targets)
        result = self._run_step()  # no refresh since the window step: its head ran in it
        if not np.array_equal(np.asarray(targets, dtype=np.int64), self._step.rows.window_positions):
            raise ValueError("a padded window step computes the head on its window rows only")
        return result.tokens, result.probs

    def _refresh(self, r, window_positions, key_is_mask):
        n = self.n_positions
        shape = RefreshShape(r, n, bk.bucket_for(max(len(window_positions), 1), self.sizes))
        prog = self.programs.get(shape) or self._build_refresh_program(shape)
        window_rows, window_valid = bk.pad(window_positions, shape.window, 0)
        prog.run(_int64(_RefreshInputs(window_rows, window_valid, key_is_mask)), sync=False)
        self.current = self.caches.boundary[r + 1][:n]
        first, last = self.ranges[r]
        return RangeStats(colsum=prog.device_out.view(last - first, n))

    # ---- the window step ---------------------------------------------------------------------------------------
    def _run_step(self) -> "_StepResult":
        """Run the recorded window step once (upload, program, one copy back), then split its statistics."""
        step = self._step
        if step.result is not None:
            return step.result
        rows, n = step.rows, self.n_positions
        shape = bk.step_shape(n, len(rows.positions), len(rows.track_rows), len(rows.window_rows), self.sizes)
        self.last_shape = shape
        prog = self.programs.get(shape) or self._build_window_program(shape)
        ids, query_valid = bk.pad(step.ids, shape.queries, self.config.mask_token_id)
        positions, _ = bk.pad(rows.positions, shape.queries, n)
        track_rows, track_valid = bk.pad(rows.track_rows, shape.tracked, 0)
        track_positions, _ = bk.pad(rows.track_positions, shape.tracked, n)
        window_rows, window_valid = bk.pad(rows.window_rows, shape.window, 0)
        key_is_mask = np.append(np.asarray(rows.key_is_mask, dtype=np.int64), 1)
        prog.run(_int64(_WindowInputs(ids, positions, track_rows, track_positions, window_rows,
                                      query_valid, track_valid, window_valid, key_is_mask)))
        parts = iter(np.split(prog.host.float().numpy(), np.cumsum(self._window_output_sizes(shape))[:-1]))
        stats = []
        for first, last in self.ranges:
            drift, colsum = next(parts), next(parts)
            stats.append(RangeStats(colsum=colsum.reshape(last - first, n).copy(),
                                    drift=drift.reshape(last - first, 2).copy()))
        w = len(rows.window_rows)
        tokens, probs = next(parts), next(parts)
        step.result = _StepResult(stats, tokens[:w].astype(np.int64), probs[:w].copy())
        return step.result

    def _window_output_sizes(self, shape: bk.StepShape) -> list[int]:
        """The window program's host output, in order: per range its drifts [layers, 2] and column sums
        [layers, canvas]; then the head's tokens and probabilities on the padded window rows."""
        per_range = [[(b - a) * 2, (b - a) * shape.canvas] for a, b in self.ranges]
        return [size for sizes in per_range for size in sizes] + [shape.window, shape.window]

    def _build_window_program(self, shape: bk.StepShape) -> "_Program":
        n, t, caches = shape.canvas, self.torch, self.caches
        sizes = _WindowInputs(ids=shape.queries, positions=shape.queries, track_rows=shape.tracked,
                              track_positions=shape.tracked, window_rows=shape.window, query_valid=shape.queries,
                              track_valid=shape.tracked, window_valid=shape.window, key_is_mask=n + 1)
        prog = self._program(sum(sizes), sum(self._window_output_sizes(shape)))
        key_valid = t.arange(n + 1, device=self.device) < n

        def step():
            x = _WindowInputs(*prog.device_in.split(list(sizes)))
            query_valid, track_valid = x.query_valid.bool(), x.track_valid.bool()
            window_valid, key_is_mask = x.window_valid.bool(), x.key_is_mask.bool()
            hidden = self.embedding(x.ids)
            caches.boundary[0].index_copy_(0, x.positions, hidden)
            stats = []
            for r, (first, last) in enumerate(self.ranges):
                out = self.layers[r].window(hidden, x.positions, x.track_rows, x.window_rows, key_is_mask,
                                            *caches.window_inputs(first, last, x.track_positions),
                                            query_valid=query_valid, key_valid=key_valid, track_valid=track_valid,
                                            window_valid=window_valid)
                hidden, per_layer = _split_layers(out, WindowOut)
                for layer, new in zip(range(first, last), per_layer):
                    caches.put_rows(layer, x.positions, new)
                stats += [new.drift for new in per_layer] + [new.colsum[:n] for new in per_layer]
                caches.boundary[r + 1].index_copy_(0, x.positions, hidden)
            tokens, probs = self.head_piece(hidden, x.window_rows)
            flat = t.cat([s.reshape(-1).float() for s in stats] + [tokens.float(), probs.float()])
            prog.host.copy_(flat, non_blocking=True)

        # Capture with inert inputs: every row a pad row in the scratch slot, so warm-up writes nothing real.
        inert = _WindowInputs(ids=np.full(shape.queries, self.config.mask_token_id),
                              positions=np.full(shape.queries, n), track_rows=np.zeros(shape.tracked),
                              track_positions=np.full(shape.tracked, n), window_rows=np.zeros(shape.window),
                              query_valid=np.zeros(shape.queries), track_valid=np.zeros(shape.tracked),
                              window_valid=np.zeros(shape.window), key_is_mask=np.ones(n + 1))
        prog.upload(_int64(inert))
        prog.fn, prog.replay = step, self._capture(step)
        self.programs[shape] = prog
        return prog

    def _build_refresh_program(self, shape: RefreshShape) -> "_Program":
        r, n, caches = shape.layer_range, shape.canvas, self.caches
        first, last = self.ranges[r]
        sizes = _RefreshInputs(window_rows=shape.window, window_valid=shape.window, key_is_mask=n)
        prog = self._program(sum(sizes), 0, device_out=(last - first) * n)
        colsums = prog.device_out.view(last - first, n)

        def step():
            x = _RefreshInputs(*prog.device_in.split(list(sizes)))
            out = self.layers[r].refresh(caches.boundary[r][:n], caches.positions, x.window_rows,
                                         x.key_is_mask.bool(), window_valid=x.window_valid.bool())
            hidden, per_layer = _split_layers(out, RefreshOut)
            for i, (layer, new) in enumerate(zip(range(first, last), per_layer)):
                caches.put_all(layer, n, new)
                colsums[i].copy_(new.colsum)
            caches.boundary[r + 1][:n].copy_(hidden)

        prog.fn = step
        prog.capture_on_first_run = self._capture  # refresh is idempotent: warming up on real inputs is harmless
        self.programs[shape] = prog
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
        self._graphs.append(graph)
        return graph.replay


# ---- several sequences in one call: inputs padded as the contract says (shared with the TensorRT backend) ---------
def padded_rows(torch, device, rows: list, fill, length: int | None = None):
    """Tensors or arrays of one sequence each ([n_i, ...]) as one [B, longest (or length), ...] device tensor,
    `fill` after each sequence's own rows."""
    rows = [r if isinstance(r, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(r)).to(device) for r in rows]
    length = max(len(r) for r in rows) if length is None else length
    out = torch.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=rows[0].dtype, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def stacked_caches(torch, caches: list, length: int):
    """Caches [H, n_i, hd] of each sequence as one [B, H, length, hd] tensor (zeros past each canvas)."""
    heads, _, dim = caches[0].shape
    out = torch.zeros((len(caches), heads, length, dim), dtype=caches[0].dtype, device=caches[0].device)
    for i, c in enumerate(caches):
        out[i, :, : c.shape[1]] = c
    return out


def torch_backend(model_dir: str | Path | RandomWeights, layers_per_range: int = 1, device: str | None = None,
                  dtype: str = "fp32", buckets: bool = False, graphs: bool = False, fast: bool | None = None):
    """The torch backend for these options: buckets, padded fixed-shape window steps; graphs, also CUDA graphs
    (implies buckets; eager on CPU); fast, fused QKV + scaled_dot_product_attention (default: on with graphs)."""
    if buckets or graphs:
        return PaddedTorchBackend(model_dir, layers_per_range, device, dtype, graphs=graphs, fast=fast)
    return TorchBackend(model_dir, layers_per_range, device, dtype, fast=bool(fast))


# ---- caches, pass outputs, step records --------------------------------------------------------------------------
@dataclass
class Caches:
    """One canvas's device tensors: key, value and query per layer [n_heads, slots, head_dim], the hidden rows
    entering each range [slots, d_model] ("boundaries"), and the canvas position ids."""
    k: list
    v: list
    q: list
    boundary: list
    positions: Any

    @classmethod
    def zeros(cls, config: ModelConfig, n: int, scratch_slots: int, n_boundaries: int, dtype, device) -> "Caches":
        """Caches for a canvas of n positions, with scratch_slots more cache slots past them."""
        import torch

        slots = n + scratch_slots
        shape = (config.n_heads, slots, config.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        return cls(k=k, v=[torch.zeros_like(x) for x in k], q=[torch.zeros_like(x) for x in k],
                   boundary=[torch.zeros((slots, config.d_model), dtype=dtype, device=device)
                             for _ in range(n_boundaries)],
                   positions=torch.arange(n, device=device))

    def zero_(self) -> None:
        for x in [*self.k, *self.v, *self.q, *self.boundary]:
            x.zero_()

    def window_inputs(self, first: int, last: int, track_positions) -> list:
        """The cache inputs of a window pass over layers [first, last): per layer past key, past value and the
        tracked tokens' cached queries."""
        out = []
        for layer in range(first, last):
            out += [self.k[layer], self.v[layer], self.q[layer].index_select(1, track_positions)]
        return out

    def put_rows(self, layer: int, positions, new: "WindowOut") -> None:
        self.k[layer].index_copy_(1, positions, new.key)
        self.v[layer].index_copy_(1, positions, new.value)
        self.q[layer].index_copy_(1, positions, new.query)

    def put_all(self, layer: int, n: int, new: "RefreshOut") -> None:
        self.k[layer][:, :n].copy_(new.key)
        self.v[layer][:, :n].copy_(new.value)
        self.q[layer][:, :n].copy_(new.query)


class WindowOut(NamedTuple):
    """One layer's outputs of LayerRange.window (which returns hidden_out, then these for each layer)."""
    key: Any
    value: Any
    query: Any
    drift: Any
    colsum: Any


class RefreshOut(NamedTuple):
    """One layer's outputs of LayerRange.refresh (which returns hidden_out, then these for each layer)."""
    key: Any
    value: Any
    query: Any
    colsum: Any


def _split_layers(out: tuple, per_layer: type[WindowOut] | type[RefreshOut]) -> tuple[Any, list]:
    """(hidden_out, [per_layer(...) for each layer]) from a LayerRange pass's flat output tuple."""
    hidden, *rest = out
    width = len(per_layer._fields)
    return hidden, [per_layer(*rest[i: i + width]) for i in range(0, len(rest), width)]


@dataclass(frozen=True)
class RefreshShape:
    """The key of a padded refresh program: layer range, canvas length, window bucket."""
    layer_range: int
    canvas: int
    window: int


class _WindowInputs(NamedTuple):
    """The inputs of a padded window program in the order they sit in its one int64 input buffer; the same tuple
    holds their sizes, the host arrays, or the device views."""
    ids: Any
    positions: Any
    track_rows: Any
    track_positions: Any
    window_rows: Any
    query_valid: Any
    track_valid: Any
    window_valid: Any
    key_is_mask: Any


class _RefreshInputs(NamedTuple):
    """The inputs of a padded refresh program, as _WindowInputs."""
    window_rows: Any
    window_valid: Any
    key_is_mask: Any


def _int64(parts: tuple) -> np.ndarray:
    """Host input arrays as one int64 buffer, in the order of their fields."""
    return np.concatenate([np.asarray(p) for p in parts]).astype(np.int64)


class _StepRows(NamedTuple):
    """The rows of a padded window step; every range of the step must get the same."""
    positions: np.ndarray
    track_rows: np.ndarray
    track_positions: np.ndarray
    window_rows: np.ndarray
    window_positions: np.ndarray
    key_is_mask: np.ndarray

    def same_as(self, other: "_StepRows") -> bool:
        return all(np.array_equal(x, y) for x, y in zip(self, other))


@dataclass
class _StepResult:
    stats: list[RangeStats]   # per range, on the host
    tokens: np.ndarray        # the head on the window rows
    probs: np.ndarray


@dataclass
class _WindowStep:
    """A padded window step: the embedded ids, the rows its ranges were given, and (once run) its results."""
    ids: np.ndarray
    rows: _StepRows | None = None
    result: _StepResult | None = None


@dataclass
class _Program:
    """One fixed-shape computation: its static input buffers (host staging -> device), its outputs (a host buffer
    that the step copies into, and/or a device buffer), and how to run it (a graph replay, or eagerly)."""
    staging: Any
    device_in: Any
    host: Any
    device_out: Any
    sync: Any
    fn: Any = None
    replay: Any = None
    capture_on_first_run: Any = None
    runs: int = 0
    _uploaded: np.ndarray | None = None

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
