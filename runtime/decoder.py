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
    def __init__(self, backend: Backend, policy: Policy, schedule, detokenize=None):
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
        backend, policy = self.backend, self.policy
        ranges = backend.ranges
        if queries is None:
            backend.embed(canvas.ids)
            refresh_from = 0
        else:
            backend.embed(canvas.ids[queries], queries)
            refresh_from = len(ranges)
        refreshed = 0
        r = 0
        while r < len(ranges):
            if r >= refresh_from:
                stats = backend.refresh(r, targets, key_is_mask)
                refreshed += ranges[r][1] - ranges[r][0]
            else:
                stats = backend.window(r, queries, policy.tracked(), targets, key_is_mask)
                trigger = policy.refresh_from(r, stats.drift)
                if trigger is not None:
                    refresh_from = trigger
                    if trigger == r:  # rerun this range in refresh mode; its window results are superseded
                        continue
            policy.observe(ranges[r][0], stats.colsum)
            r += 1
        return refreshed
