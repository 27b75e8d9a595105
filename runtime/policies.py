"""Cache policies: which rows each step recomputes, and from which layer range on everything is refreshed.

A policy sees only host-visible statistics (per-layer drift similarities and attention column sums) and plain
position arrays; it never touches a backend or a tensor library.

- none:    recompute every position at every layer, every step.
- prefix:  Fast-dLLM prefix cache: full pass at each block start, then the block and everything after it.
- dual:    Fast-dLLM dual cache: full pass at each block start, then only the block.
- elastic: Elastic-Cache: full pass at step 0, then only tracked + freshly decoded + window rows; a drift test on
           the most-attended tokens switches the remaining layer ranges to a full refresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schedule import Canvas, Targets


@dataclass
class StepPlan:
    queries: np.ndarray | None   # positions recomputed in window mode; None = full refresh of every range


class Policy:
    name = "base"
    needs_blocks = False

    def begin(self, canvas: Canvas) -> None:
        pass

    def plan(self, canvas: Canvas, targets: Targets) -> StepPlan:
        raise NotImplementedError

    def observe(self, first_layer: int, colsum: np.ndarray) -> None:
        """Attention column sums [layers_in_range, N] of a range that just ran (either mode)."""

    def refresh_from(self, range_index: int, drift: np.ndarray) -> int | None:
        """After a window-mode range: the range index from which to refresh everything, or None."""
        return None

    def end_step(self, committed: np.ndarray) -> None:
        pass

    def tracked(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


class NoCache(Policy):
    name = "none"

    def plan(self, canvas, targets):
        return StepPlan(None)


class PrefixCache(Policy):
    name = "prefix"
    needs_blocks = True

    def plan(self, canvas, targets):
        if targets.block_start:
            return StepPlan(None)
        return StepPlan(np.arange(targets.block[0], canvas.n))


class DualCache(Policy):
    name = "dual"
    needs_blocks = True

    def plan(self, canvas, targets):
        if targets.block_start:
            return StepPlan(None)
        return StepPlan(np.arange(targets.block[0], targets.block[1]))


@dataclass
class ElasticCache(Policy):
    gamma: float = 0.9
    track_num: int = 1
    drift_metric: str = "heads"     # "heads": the reference code's cosine across heads; "keys": the paper's
    alignment: str = "rerun"        # "rerun": refresh from the start of the drifting range; "next": from the next
    name: str = "elastic"

    def __post_init__(self):
        if self.drift_metric not in ("heads", "keys"):
            raise ValueError(f"drift metric must be 'heads' or 'keys', got {self.drift_metric!r}")
        if self.alignment not in ("rerun", "next"):
            raise ValueError(f"refresh alignment must be 'rerun' or 'next', got {self.alignment!r}")
        if self.track_num < 1:
            raise ValueError(f"track num must be at least 1, got {self.track_num}")

    def begin(self, canvas):
        self._tracked = np.zeros(0, dtype=np.int64)
        self._fresh = np.arange(canvas.prompt_len)
        self._picks: list[np.ndarray] = []

    def plan(self, canvas, targets):
        self._picks = []
        if canvas.step == 0:
            return StepPlan(None)
        rows = np.concatenate([self._tracked, self._fresh, targets.positions]).astype(np.int64)
        _, first = np.unique(rows, return_index=True)
        return StepPlan(rows[np.sort(first)])  # de-duplicated, order kept: tracked, fresh, window

    def observe(self, first_layer, colsum):
        for row in colsum:  # one most-attended set per layer (still-MASK keys were zeroed by the piece)
            self._picks.append(np.argsort(-row, kind="stable")[: self.track_num])

    def refresh_from(self, range_index, drift):
        column = 0 if self.drift_metric == "heads" else 1
        if np.any(drift[:, column] < self.gamma):
            return range_index if self.alignment == "rerun" else range_index + 1
        return None

    def end_step(self, committed):
        self._tracked = np.unique(np.concatenate(self._picks)) if self._picks else self._tracked
        self._fresh = np.sort(committed)

    def tracked(self):
        return self._tracked


def make_policy(name: str, gamma: float = 0.9, track_num: int = 1, drift_metric: str = "heads",
                alignment: str = "rerun") -> Policy:
    if name == "none":
        return NoCache()
    if name == "prefix":
        return PrefixCache()
    if name == "dual":
        return DualCache()
    if name == "elastic":
        return ElasticCache(gamma, track_num, drift_metric, alignment)
    raise ValueError(f"unknown cache policy {name!r} (choose none, prefix, dual or elastic)")
