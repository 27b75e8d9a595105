"""Which positions may be decoded at a step, and which predictions get committed.

Two schedules, both greedy:
- BlockSchedule: LLaDA's semi-autoregressive blocks (fixed steps per block with low-confidence remasking, or a
  confidence threshold as in Fast-dLLM).
- WindowSchedule: Elastic-Cache's sliding window over the beta left-most MASK positions.
Early stop (abandon every MASK after the first committed end token: EOS, end-of-turn, ...) is a flag of either
schedule. A schedule is reset by begin() at the start of every generation, so one can be reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Canvas:
    """Decoding state shared by the schedule, the policy and the decoder."""

    ids: np.ndarray               # [N] int64: prompt followed by the generation region
    prompt_len: int
    mask_id: int
    end_ids: tuple[int, ...]      # token ids that end the answer
    pending: np.ndarray = field(default=None)  # sorted generation positions still to decode
    eos_cut: bool = False         # early stop already applied
    step: int = 0

    def __post_init__(self):
        if self.pending is None:
            self.pending = np.flatnonzero(self.ids == self.mask_id)
            self.pending = self.pending[self.pending >= self.prompt_len]

    @property
    def n(self) -> int:
        return len(self.ids)

    def is_mask(self) -> np.ndarray:
        return self.ids == self.mask_id

    def commit(self, positions: np.ndarray, tokens: np.ndarray, early_stop: bool) -> None:
        self.ids[positions] = tokens
        self.pending = np.setdiff1d(self.pending, positions)
        if early_stop and not self.eos_cut:
            end_at = positions[np.isin(tokens, self.end_ids)]
            if len(end_at):
                self.eos_cut = True
                self.pending = self.pending[self.pending < end_at.min()]


@dataclass
class Targets:
    positions: np.ndarray                 # positions whose predictions are needed (sorted)
    block: tuple[int, int] | None = None  # current block [start, end) of a block schedule
    block_start: bool = False             # first step of that block


def threshold_pick(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Indices with probability >= threshold; at least the single most confident one."""
    take = np.flatnonzero(probs >= threshold)
    return take if len(take) else np.array([int(np.argmax(probs))])


def top_k_pick(probs: np.ndarray, k: int) -> np.ndarray:
    """The k most confident indices; ties go to the lower position (indices are in position order)."""
    return np.sort(np.argsort(-probs, kind="stable")[:k])


@dataclass
class BlockSchedule:
    gen_length: int
    block_length: int = 32
    steps: int | None = None          # total steps (LLaDA); None means threshold-driven (Fast-dLLM)
    threshold: float | None = None
    early_stop: bool = False
    name: str = "block"

    def __post_init__(self):
        if self.gen_length % self.block_length:
            raise ValueError(f"gen length {self.gen_length} must be a multiple of block length {self.block_length}")
        n_blocks = self.gen_length // self.block_length
        if self.steps is None and self.threshold is None:
            raise ValueError("the block schedule needs --steps or --threshold")
        if self.steps is not None and (self.steps < n_blocks or self.steps % n_blocks):
            raise ValueError(f"steps ({self.steps}) must be a positive multiple of the number of blocks ({n_blocks})")
        self.begin()

    @property
    def width(self) -> int:
        """The most positions one step targets."""
        return self.block_length

    def begin(self) -> None:
        self._block = -1
        self._quota: list[int] = []

    def block_bounds(self, canvas: Canvas) -> tuple[int, int]:
        """The block holding the left-most pending position."""
        b = (int(canvas.pending[0]) - canvas.prompt_len) // self.block_length
        start = canvas.prompt_len + b * self.block_length
        return start, start + self.block_length

    def targets(self, canvas: Canvas) -> Targets:
        start, end = self.block_bounds(canvas)
        block_start = start != self._block
        if block_start:  # entering a new block: LLaDA spreads its masks evenly over its steps
            self._block = start
            if self.steps is not None:
                per_block = self.steps // (self.gen_length // self.block_length)
                n_masks = int(np.sum((canvas.pending >= start) & (canvas.pending < end)))
                base, extra = divmod(n_masks, per_block)
                self._quota = [base + (1 if i < extra else 0) for i in range(per_block)]
        p = canvas.pending
        return Targets(p[(p >= start) & (p < end)], (start, end), block_start)

    def select(self, probs: np.ndarray) -> np.ndarray:
        if self.steps is None:
            return threshold_pick(probs, self.threshold)
        k = self._quota.pop(0) if self._quota else 1
        return top_k_pick(probs, max(1, min(k, len(probs))))


@dataclass
class WindowSchedule:
    gen_length: int
    window: int = 16
    threshold: float | None = 0.9
    tokens_per_step: int = 1          # used when threshold is None
    early_stop: bool = True
    name: str = "window"

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")

    @property
    def width(self) -> int:
        """The most positions one step targets."""
        return self.window

    def begin(self) -> None:
        pass  # stateless

    def targets(self, canvas: Canvas) -> Targets:
        return Targets(canvas.pending[: self.window])

    def select(self, probs: np.ndarray) -> np.ndarray:
        if self.threshold is not None:
            return threshold_pick(probs, self.threshold)
        return top_k_pick(probs, min(self.tokens_per_step, len(probs)))
