"""The backend interface: run pieces, own the caches, return only small host-visible statistics.

Caches a backend keeps for a canvas of N positions (one set per generation, fixed addresses):
- per layer L: key, value, query [n_heads, N, head_dim] (post-RoPE)
- per layer range r: the hidden states entering its first layer [N, d_model] ("boundary" r); refresh mode reads
  them, so a range can be recomputed for every position without running the ranges before it.

Row bookkeeping shared by all backends lives here; the math lives in the pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig, ModelError


class BackendError(Exception):
    """A backend cannot be used here (not installed, no device, bad engine files): one clear line."""


class RowLimit(ModelError):
    """A step needs more rows in one call than the engine's pieces take (its --max-active): the request's options
    (window, block length, generation length with the prefix cache) are too large for this engine."""


@dataclass
class RangeStats:
    colsum: np.ndarray               # [layers_in_range, N] float32, still-MASK keys zeroed
    drift: np.ndarray | None = None  # [layers_in_range, 2] float32 (window mode only): across heads, across keys
    pending: int | None = None       # a backend that runs a whole step at once: this range's stats come at fetch


def stat_tensors(stats: list[RangeStats]) -> list:
    """The statistics tensors of a step in the order split_stats expects them (drift omitted where absent)."""
    return [t for st in stats for t in (st.colsum, st.drift) if t is not None]


def split_stats(stats: list[RangeStats], flat: np.ndarray) -> list[RangeStats]:
    """Host RangeStats cut from `flat`, the concatenation of stat_tensors(stats) flattened (one device copy)."""
    out, at = [], 0
    for st in stats:
        parts = []
        for t in (st.colsum, st.drift):
            if t is None:
                parts.append(None)
                continue
            n = int(np.prod(t.shape))
            parts.append(flat[at: at + n].reshape(tuple(t.shape)))
            at += n
        out.append(RangeStats(colsum=parts[0], drift=parts[1]))
    return out


def rows_of(positions: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row index of each wanted canvas position inside `positions` (all must be present)."""
    order = np.argsort(positions, kind="stable")
    idx = np.searchsorted(positions[order], wanted)
    if len(wanted) and (idx.max() >= len(positions) or np.any(positions[order[idx]] != wanted)):
        raise ValueError("requested positions are not among the rows computed at this step")
    return order[idx].astype(np.int64)


@dataclass
class SequenceCaches:
    """One sequence's place in a backend: what Backend.open() returns and the batched calls take."""
    n_positions: int
    state: object = None               # the backend's own buffers for this canvas (what _allocate returned)
    rows: np.ndarray | None = None     # canvas positions of the hidden rows the next pass reads (None: every one)


class Backend:
    """Subclasses implement the underscored methods; the public ones are what the decoder calls.

    Sequences: open(n) gives a sequence its caches, use(c) makes them the ones the single-sequence calls (embed,
    window, refresh, head) work on, close(c) gives them back; begin(n) does all three for one sequence at a time.
    A backend whose `max_batch` is above 1 also runs the *_many calls for several sequences in one piece call each
    (_embed_many, ...); for every other backend the decoder steps one sequence after another."""

    name = "base"
    calibration: dict = {}            # the engine's calibration block (manifest.json), read-only; {} = none
    weight_bytes: int | None = None   # the weights held in memory, each stored tensor counted once (when known)
    one_sync_per_step = False   # the decoder batches window passes and reads statistics once per step
    max_batch = 1               # sequences one piece call may carry (> 1: the *_many calls are implemented)
    max_active: int | None = None   # query, tracked, window or head rows one piece call takes (None: no limit)
    activation_dtype = "fp32"   # of the caches (what a sequence's memory is counted in)
    config: ModelConfig
    ranges: list[tuple[int, int]]
    _seq: SequenceCaches | None = None   # the sequence the single-sequence calls work on
    _own: SequenceCaches | None = None   # begin()'s sequence

    # ---- implemented by each backend -------------------------------------------------------------------------
    def _allocate(self, n: int):
        """The buffers of a canvas of n positions (returned, or kept on the backend where one sequence at a time
        is all it runs)."""
    def _use(self, state) -> None:
        """Make `state` (an _allocate result) the buffers the primitives below work on."""
    def _release(self, state) -> None:
        """A sequence is over: its buffers may be reused."""
    def _embed(self, ids: np.ndarray, positions: np.ndarray | None) -> None:
        """Embed ids; store them into boundary 0 (at positions, or whole when None); keep them as current."""
    def _window(self, r: int, positions: np.ndarray, track_rows: np.ndarray, track_positions: np.ndarray,
                window_rows: np.ndarray, key_is_mask: np.ndarray) -> RangeStats:
        """Run range r in window mode on the current rows; write new K/V/Q rows into the caches; store the
        output rows into boundary r+1 (if any) and keep them as current."""
    def _refresh(self, r: int, window_positions: np.ndarray, key_is_mask: np.ndarray) -> RangeStats:
        """Run range r in refresh mode from boundary r; overwrite its caches; store the output into boundary
        r+1 (if any) and keep it as current."""
    def _head(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    # backends with max_batch > 1: the same for several sequences (lists, one entry per sequence), one call each
    def _embed_many(self, states: list, ids: list, positions: list) -> None: ...
    def _window_many(self, r: int, states: list, positions: list, track_rows: list, track_positions: list,
                     window_rows: list, key_is_mask: list) -> list[RangeStats]: ...
    def _refresh_many(self, r: int, states: list, window_positions: list, key_is_mask: list) -> list[RangeStats]: ...
    def _head_many(self, states: list, rows: list) -> list[tuple[np.ndarray, np.ndarray]]: ...

    # ---- sequences ---------------------------------------------------------------------------------------------
    def open(self, n_positions: int) -> SequenceCaches:
        return SequenceCaches(n_positions, self._allocate(n_positions))

    def use(self, seq: SequenceCaches) -> None:
        if seq is not self._seq:
            self._seq = seq
            self._use(seq.state)

    def close(self, seq: SequenceCaches) -> None:
        if seq is self._seq:
            self._seq = None
        self._release(seq.state)

    def begin(self, n_positions: int) -> SequenceCaches:
        """One sequence at a time: the previous begin()'s caches are given back, a canvas of n is opened and used.
        They stay open until the next begin(), so that what a generation left in them can be inspected."""
        if self._own is not None:
            self.close(self._own)
        self._own = self.open(n_positions)
        self.use(self._own)
        return self._own

    @property
    def n_positions(self) -> int:
        return self._seq.n_positions

    @property
    def _rows(self) -> np.ndarray | None:
        return self._seq.rows

    def check_rows(self, queries: int, tracked: int, targets: int) -> None:
        """RowLimit when one sequence's step needs more rows than a piece call takes (checked before any call, so
        that a request too large for the engine fails alone, not the batch it would have joined)."""
        for count, what in ((queries, "a window pass"), (tracked, "the tracked rows"), (targets, "the decoding window")):
            if count:
                self._check_active(count, what)

    def _check_active(self, count: int, what: str) -> None:
        """RowLimit when `count` rows are more than a piece call takes (no limit here)."""

    # ---- the interface: the sequence in use --------------------------------------------------------------------
    def embed(self, ids: np.ndarray, positions: np.ndarray | None = None) -> None:
        self._seq.rows = None if positions is None else np.asarray(positions, dtype=np.int64)
        self._embed(np.asarray(ids, dtype=np.int64), self._seq.rows)

    def window(self, r: int, positions: np.ndarray, tracked: np.ndarray, targets: np.ndarray,
               key_is_mask: np.ndarray) -> RangeStats:
        return self._window(r, *self._window_rows(self._seq, positions, tracked, targets), key_is_mask)

    def refresh(self, r: int, targets: np.ndarray, key_is_mask: np.ndarray) -> RangeStats:
        self._seq.rows = None
        return self._refresh(r, np.asarray(targets, dtype=np.int64), key_is_mask)

    def head(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._head(self._head_rows(self._seq, targets))

    # ---- the interface: several sequences (one piece call each where max_batch allows, else one by one) --------
    def embed_many(self, seqs: list[SequenceCaches], ids: list, positions: list) -> None:
        if len(seqs) == 1:
            self.use(seqs[0])
            return self.embed(ids[0], positions[0])
        self._check_batch(seqs)
        for seq, p in zip(seqs, positions):
            seq.rows = None if p is None else np.asarray(p, dtype=np.int64)
        self._embed_many([s.state for s in seqs], [np.asarray(i, dtype=np.int64) for i in ids],
                         [s.rows for s in seqs])

    def window_many(self, r: int, seqs: list[SequenceCaches], positions: list, tracked: list, targets: list,
                    key_is_mask: list) -> list[RangeStats]:
        if len(seqs) == 1:
            self.use(seqs[0])
            return [self.window(r, positions[0], tracked[0], targets[0], key_is_mask[0])]
        self._check_batch(seqs)
        rows = [self._window_rows(*args) for args in zip(seqs, positions, tracked, targets)]
        return self._window_many(r, [s.state for s in seqs], *map(list, zip(*rows)), key_is_mask)

    def refresh_many(self, r: int, seqs: list[SequenceCaches], targets: list, key_is_mask: list) -> list[RangeStats]:
        if len(seqs) == 1:
            self.use(seqs[0])
            return [self.refresh(r, targets[0], key_is_mask[0])]
        self._check_batch(seqs)
        for seq in seqs:
            seq.rows = None
        return self._refresh_many(r, [s.state for s in seqs], [np.asarray(t, dtype=np.int64) for t in targets],
                                  key_is_mask)

    def head_many(self, seqs: list[SequenceCaches], targets: list) -> list[tuple[np.ndarray, np.ndarray]]:
        if len(seqs) == 1:
            self.use(seqs[0])
            return [self.head(targets[0])]
        self._check_batch(seqs)
        return self._head_many([s.state for s in seqs], [self._head_rows(s, t) for s, t in zip(seqs, targets)])

    def _check_batch(self, seqs: list) -> None:
        if len(seqs) > self.max_batch:
            raise ValueError(f"{len(seqs)} sequences in one call; this backend takes at most {self.max_batch}")

    @staticmethod
    def _window_rows(seq: SequenceCaches, positions, tracked, targets):
        """(positions, track_rows, track_positions, window_rows) of a window pass, checked against the rows the
        sequence's hidden states are at."""
        positions = np.asarray(positions, dtype=np.int64)
        if seq.rows is None or not np.array_equal(seq.rows, positions):
            raise ValueError("window mode must run on the rows embedded (or produced) at this step")
        if len(tracked) == 0:  # nothing tracked (non-elastic policies): the drift output is then ignored
            tracked = positions[:1]
        tracked = np.asarray(tracked, dtype=np.int64)
        return positions, rows_of(positions, tracked), tracked, rows_of(positions, targets)

    @staticmethod
    def _head_rows(seq: SequenceCaches, targets) -> np.ndarray:
        targets = np.asarray(targets, dtype=np.int64)
        return targets if seq.rows is None else rows_of(seq.rows, targets)

    def free_cache_memory(self) -> int | None:
        """Bytes free where this backend keeps its caches (here: host memory the process may still use; None where
        unknown)."""
        from ..memory import current_rss_bytes, machine_memory_bytes

        total = machine_memory_bytes()
        return None if total is None else max(0, total - current_rss_bytes())

    def warmup(self, max_len: int | None = None) -> None:
        """Do at load what the first request at canvas length max_len would otherwise pay for (a no-op here)."""

    def fetch(self, stats: list[RangeStats]) -> list[RangeStats]:
        """The statistics as host numpy arrays, moved in one transfer where they live on a device."""
        return stats

    def describe(self) -> str:
        return self.name
