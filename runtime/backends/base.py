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

from ..config import ModelConfig


class BackendError(Exception):
    """A backend cannot be used here (not installed, no device, bad engine files): one clear line."""


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


class Backend:
    """Subclasses implement the underscored methods; the public ones are what the decoder calls."""

    name = "base"
    calibration: dict = {}            # the engine's calibration block (manifest.json), read-only; {} = none
    weight_bytes: int | None = None   # the weights held in memory, each stored tensor counted once (when known)
    one_sync_per_step = False   # the decoder batches window passes and reads statistics once per step
    config: ModelConfig
    ranges: list[tuple[int, int]]

    # ---- implemented by each backend -------------------------------------------------------------------------
    def _allocate(self, n: int) -> None: ...
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

    # ---- the interface -----------------------------------------------------------------------------------------
    def begin(self, n_positions: int) -> None:
        self.n_positions = n_positions
        self._rows: np.ndarray | None = None
        self._allocate(n_positions)

    def embed(self, ids: np.ndarray, positions: np.ndarray | None = None) -> None:
        self._rows = None if positions is None else np.asarray(positions, dtype=np.int64)
        self._embed(np.asarray(ids, dtype=np.int64), self._rows)

    def window(self, r: int, positions: np.ndarray, tracked: np.ndarray, targets: np.ndarray,
               key_is_mask: np.ndarray) -> RangeStats:
        positions = np.asarray(positions, dtype=np.int64)
        if self._rows is None or not np.array_equal(self._rows, positions):
            raise ValueError("window mode must run on the rows embedded (or produced) at this step")
        if len(tracked) == 0:  # nothing tracked (non-elastic policies): the drift output is then ignored
            tracked = positions[:1]
        return self._window(r, positions, rows_of(positions, tracked), np.asarray(tracked, dtype=np.int64),
                            rows_of(positions, targets), key_is_mask)

    def refresh(self, r: int, targets: np.ndarray, key_is_mask: np.ndarray) -> RangeStats:
        self._rows = None
        return self._refresh(r, np.asarray(targets, dtype=np.int64), key_is_mask)

    def head(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        targets = np.asarray(targets, dtype=np.int64)
        rows = targets if self._rows is None else rows_of(self._rows, targets)
        return self._head(rows)

    def warmup(self, max_len: int | None = None) -> None:
        """Do at load what the first request at canvas length max_len would otherwise pay for (a no-op here)."""

    def fetch(self, stats: list[RangeStats]) -> list[RangeStats]:
        """The statistics as host numpy arrays, moved in one transfer where they live on a device."""
        return stats

    def describe(self) -> str:
        return self.name
