"""The decoding loop: schedule x policy x backend -> GenerationResult. Owns no math and no tensors."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .backends.base import Backend
from .policies import Policy
from .schedule import BlockSchedule, Canvas


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]          # generated ids before the first end token (what is counted as generated)
    canvas_ids: list[int]         # the whole generation region as it ended (EOS and undecoded MASKs included)
    tokens: int                   # = len(token_ids)
    steps: int                    # forward passes (NFE)
    seconds: float
    tokens_per_second: float
    tokens_per_step: float
    refresh_fraction: float       # layer-steps recomputed for every position / all layer-steps
    layer_steps_refreshed: int
    layer_steps_total: int
    prompt_tokens: int
    policy: str
    schedule: str
    backend: str
    finish_reason: str = "length"  # "stop": an end token (EOS, EOT, ...) was generated; "length": none was

    def to_dict(self) -> dict:
        return asdict(self)


class Decoder:
    def __init__(self, backend: Backend, policy: Policy, schedule, detokenize=None, step_order: str = "auto"):
        """step_order: "range" decides after each window pass; "batched" runs all window passes, then decides
        once per step; "auto" takes the backend's preference (batched where a host sync is expensive: GPUs)."""
        if step_order not in ("auto", "range", "batched"):
            raise ValueError(f"step order must be auto, range or batched, got {step_order!r}")
        if step_order == "auto":
            step_order = "batched" if backend.one_sync_per_step else "range"
        self.step_order = step_order
        if policy.needs_blocks and not isinstance(schedule, BlockSchedule):
            raise ValueError(f"the {policy.name} cache follows Fast-dLLM's blocks: use the block schedule "
                             f"(--block-length), not the sliding window")
        self.backend, self.policy, self.schedule = backend, policy, schedule
        self.detokenize = detokenize or (lambda ids: " ".join(map(str, ids)))

    def generate(self, prompt_ids: list[int], on_step=None) -> GenerationResult:
        """Decode `schedule.gen_length` positions after the prompt. `on_step(canvas)` is called after each step."""
        cfg, backend, policy, schedule = self.backend.config, self.backend, self.policy, self.schedule
        n_layers = cfg.n_layers
        ids = np.concatenate([np.asarray(prompt_ids, dtype=np.int64),
                              np.full(schedule.gen_length, cfg.mask_token_id, dtype=np.int64)])
        canvas = Canvas(ids, len(prompt_ids), cfg.mask_token_id, cfg.end_ids)
        t0 = time.perf_counter()
        backend.begin(canvas.n)
        schedule.begin()
        policy.begin(canvas)
        refreshed = total = 0
        while len(canvas.pending):
            targets = schedule.targets(canvas)
            plan = policy.plan(canvas, targets)
            key_is_mask = canvas.is_mask()
            refreshed += self._run_layers(canvas, targets.positions, plan.queries, key_is_mask)
            total += n_layers
            tokens, probs = backend.head(targets.positions)
            take = schedule.select(probs)
            committed = targets.positions[take]
            canvas.commit(committed, tokens[take], schedule.early_stop)
            policy.end_step(committed)
            canvas.step += 1
            if on_step is not None:
                on_step(canvas)
        seconds = time.perf_counter() - t0
        gen = canvas.ids[canvas.prompt_len:].tolist()
        end = next((i for i, t in enumerate(gen) if t in cfg.end_ids), None)
        token_ids = gen if end is None else gen[:end]
        return GenerationResult(
            text=self.detokenize(token_ids), token_ids=token_ids, canvas_ids=gen, tokens=len(token_ids),
            steps=canvas.step, seconds=seconds, tokens_per_second=len(token_ids) / seconds if seconds else 0.0,
            tokens_per_step=len(token_ids) / max(canvas.step, 1),
            refresh_fraction=refreshed / total if total else 0.0, layer_steps_refreshed=refreshed,
            layer_steps_total=total, prompt_tokens=canvas.prompt_len, policy=policy.name, schedule=schedule.name,
            backend=backend.describe(), finish_reason="length" if end is None else "stop")

    def _run_layers(self, canvas: Canvas, targets: np.ndarray, queries, key_is_mask) -> int:
        """Run every layer range once; return how many layers ran in refresh mode."""
        if queries is None:
            self.backend.embed(canvas.ids)
            return self._refresh_ranges(0, targets, key_is_mask)
        self.backend.embed(canvas.ids[queries], queries)
        if self.step_order == "batched":
            return self._run_batched(targets, queries, key_is_mask)
        return self._run_range_by_range(targets, queries, key_is_mask)

    def _run_range_by_range(self, targets, queries, key_is_mask) -> int:
        """Decide after each window pass: a drift found early saves the later window passes (cheaper on CPU)."""
        backend, policy = self.backend, self.policy
        for r in range(len(backend.ranges)):
            (stats,) = backend.fetch([backend.window(r, queries, policy.tracked(), targets, key_is_mask)])
            trigger = policy.refresh_from(r, stats.drift)
            if trigger is not None and trigger == r:  # rerun this range in refresh mode
                return self._refresh_ranges(r, targets, key_is_mask)
            policy.observe(backend.ranges[r][0], stats.colsum)
            if trigger is not None:
                return self._refresh_ranges(trigger, targets, key_is_mask)
        return 0

    def _run_batched(self, targets, queries, key_is_mask) -> int:
        """Every window pass back to back, one transfer of all statistics to the host, then refresh passes from
        the first drifting range on. The refresh passes overwrite every cache row the superseded window passes
        wrote, so caches, decisions and tokens equal the range-by-range order (one host sync per step on a GPU)."""
        backend, policy = self.backend, self.policy
        tracked = policy.tracked()
        window = backend.fetch([backend.window(r, queries, tracked, targets, key_is_mask)
                                for r in range(len(backend.ranges))])
        refresh_from = len(window)
        for r, stats in enumerate(window):
            trigger = policy.refresh_from(r, stats.drift)
            if trigger is not None:
                refresh_from = trigger
                break
        for r in range(refresh_from):
            policy.observe(backend.ranges[r][0], window[r].colsum)
        return self._refresh_ranges(refresh_from, targets, key_is_mask)

    def _refresh_ranges(self, first: int, targets, key_is_mask) -> int:
        """Refresh ranges first.. in order; return how many layers that recomputed."""
        backend, ranges = self.backend, self.backend.ranges
        stats = backend.fetch([backend.refresh(r, targets, key_is_mask) for r in range(first, len(ranges))])
        for r, st in zip(range(first, len(ranges)), stats):
            self.policy.observe(ranges[r][0], st.colsum)
        return sum(b - a for a, b in ranges[first:])
