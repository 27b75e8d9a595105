"""The decoding loop: schedule x policy x backend -> GenerationResult. Owns no math and no tensors."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .backends.base import Backend, RangeStats, RowLimit, SequenceCaches
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
    replica: str | None = None     # the Ray Serve replica that decoded it (runtime/ray_serve.py); None: this process

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sequence:
    """One generation in progress: its canvas, schedule and policy (its own decoding options), its caches in the
    backend, and its counters. Decoder.start makes one, Decoder.step advances it, Decoder.finish ends it."""
    canvas: Canvas
    schedule: object
    policy: Policy
    caches: SequenceCaches
    started: float
    on_step: Callable | None = None    # called with the canvas after each of its steps
    caches_kept: bool = False          # the backend's begin() caches: left open when the sequence ends
    refreshed: int = 0                 # layer-steps recomputed for every position
    total: int = 0                     # layer-steps
    error: BaseException | None = None # why it could not take a step (it takes no more; the others go on)
    # this step's plan (set by Decoder.step)
    targets: object = None
    queries: np.ndarray | None = None  # rows recomputed in window mode; None: a full refresh
    key_is_mask: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return not len(self.canvas.pending)


class Decoder:
    def __init__(self, backend: Backend, policy: Policy | None = None, schedule=None, detokenize=None,
                 step_order: str = "auto"):
        """policy, schedule: what generate() decodes with (each sequence of start() may bring its own).
        step_order: "range" decides after each window pass; "batched" runs all window passes, then decides
        once per step; "auto" takes the backend's preference (batched where a host sync is expensive: GPUs)."""
        if step_order not in ("auto", "range", "batched"):
            raise ValueError(f"step order must be auto, range or batched, got {step_order!r}")
        if step_order == "auto":
            step_order = "batched" if backend.one_sync_per_step else "range"
        self.step_order = step_order
        if policy is not None:
            _check_pair(policy, schedule)
        self.backend, self.policy, self.schedule = backend, policy, schedule
        self.detokenize = detokenize or (lambda ids: " ".join(map(str, ids)))

    def generate(self, prompt_ids: list[int], on_step=None) -> GenerationResult:
        """Decode `schedule.gen_length` positions after the prompt. `on_step(canvas)` is called after each step."""
        seq = self.start(prompt_ids, on_step=on_step, keep_caches=True)   # open until the next begin()
        while not seq.done:
            self.step([seq])
            if seq.error is not None:
                raise seq.error
        return self.finish(seq)

    # ---- several sequences: start each, step them together, finish each ------------------------------------------
    def start(self, prompt_ids: list[int], schedule=None, policy: Policy | None = None, on_step=None,
              keep_caches: bool = False) -> Sequence:
        """A sequence for `prompt_ids` with its own schedule and policy (default: the decoder's), its caches opened.
        keep_caches: the backend's begin() caches, left open after the sequence (one sequence at a time)."""
        schedule, policy = schedule or self.schedule, policy or self.policy
        _check_pair(policy, schedule)
        cfg = self.backend.config
        ids = np.concatenate([np.asarray(prompt_ids, dtype=np.int64),
                              np.full(schedule.gen_length, cfg.mask_token_id, dtype=np.int64)])
        canvas = Canvas(ids, len(prompt_ids), cfg.mask_token_id, cfg.end_ids)
        started = time.perf_counter()
        schedule.begin()
        policy.begin(canvas)
        caches = self.backend.begin(canvas.n) if keep_caches else self.backend.open(canvas.n)
        return Sequence(canvas, schedule, policy, caches, started, on_step, keep_caches)

    def step(self, seqs: list[Sequence]) -> None:
        """One step of every sequence in `seqs` (none of them done). Sequences go to the backend together, up to its
        max_batch per call; each decides its own refreshes, so each ends the step as if it ran alone (up to
        last-bit differences in its statistics, docs/BENCHMARKS.md section 16). A
        sequence whose step the backend cannot take (more rows than its pieces take) gets `error` set and is left
        out; the others go on."""
        seqs = [s for s in seqs if s.error is None]
        size = max(1, self.backend.max_batch)
        for i in range(0, len(seqs), size):
            self._step(seqs[i: i + size])
        for s in seqs:
            if s.on_step is not None and s.error is None:
                s.on_step(s.canvas)

    def release(self, seq: Sequence) -> None:
        """Give a sequence's caches back (finished or abandoned); safe to call twice."""
        if seq.caches is not None and not seq.caches_kept:
            self.backend.close(seq.caches)
            seq.caches = None

    def finish(self, seq: Sequence) -> GenerationResult:
        self.release(seq)
        cfg, canvas = self.backend.config, seq.canvas
        seconds = time.perf_counter() - seq.started
        gen = canvas.ids[canvas.prompt_len:].tolist()
        end = next((i for i, t in enumerate(gen) if t in cfg.end_ids), None)
        token_ids = gen if end is None else gen[:end]
        return GenerationResult(
            text=self.detokenize(token_ids), token_ids=token_ids, canvas_ids=gen, tokens=len(token_ids),
            steps=canvas.step, seconds=seconds, tokens_per_second=len(token_ids) / seconds if seconds else 0.0,
            tokens_per_step=len(token_ids) / max(canvas.step, 1),
            refresh_fraction=seq.refreshed / seq.total if seq.total else 0.0, layer_steps_refreshed=seq.refreshed,
            layer_steps_total=seq.total, prompt_tokens=canvas.prompt_len, policy=seq.policy.name,
            schedule=seq.schedule.name, backend=self.backend.describe(), finish_reason="length" if end is None else "stop")

    # ---- one step of one group (one backend call per piece) --------------------------------------------------------
    def _step(self, seqs: list[Sequence]) -> None:
        backend, planned = self.backend, []
        for s in seqs:
            s.targets = s.schedule.targets(s.canvas)
            s.queries = s.policy.plan(s.canvas, s.targets).queries
            s.key_is_mask = s.canvas.is_mask()
            try:
                backend.check_rows(0 if s.queries is None else len(s.queries),
                                   0 if s.queries is None else len(s.policy.tracked()), len(s.targets.positions))
            except RowLimit as e:
                s.error = e
                continue
            s.total += backend.config.n_layers
            planned.append(s)
        seqs = planned
        if not seqs:
            return
        backend.embed_many([s.caches for s in seqs], [s.canvas.ids if s.queries is None else s.canvas.ids[s.queries] for s in seqs],
                           [s.queries for s in seqs])
        window = [s for s in seqs if s.queries is not None]
        refresh_from = {id(s): 0 for s in seqs if s.queries is None}
        if window:
            run = self._windows_batched if self.step_order == "batched" else self._windows_range_by_range
            refresh_from |= run(window)
        self._refreshes([s for s in seqs if id(s) in refresh_from], refresh_from)
        for s, (tokens, probs) in zip(seqs, backend.head_many([s.caches for s in seqs], [s.targets.positions for s in seqs])):
            take = s.schedule.select(probs)
            committed = s.targets.positions[take]
            s.canvas.commit(committed, tokens[take], s.schedule.early_stop)
            s.policy.end_step(committed)
            s.canvas.step += 1

    def _window_pass(self, r: int, seqs: list[Sequence]) -> list[RangeStats]:
        return self.backend.window_many(r, [s.caches for s in seqs], [s.queries for s in seqs], [s.policy.tracked() for s in seqs],
                                        [s.targets.positions for s in seqs], [s.key_is_mask for s in seqs])

    def _windows_range_by_range(self, seqs: list[Sequence]) -> dict[int, int]:
        """Decide after each window pass: a drift found early saves the later window passes (cheaper on CPU).
        Returns the first range each drifting sequence refreshes from."""
        backend, ranges, refresh_from = self.backend, self.backend.ranges, {}
        for r in range(len(ranges)):
            if not seqs:
                break
            still = []
            for s, stats in zip(seqs, backend.fetch(self._window_pass(r, seqs))):
                trigger = s.policy.refresh_from(r, stats.drift)
                if trigger is not None and trigger == r:  # rerun this range in refresh mode
                    refresh_from[id(s)] = r
                    continue
                s.policy.observe(ranges[r][0], stats.colsum)
                if trigger is not None:
                    refresh_from[id(s)] = trigger
                else:
                    still.append(s)
            seqs = still
        return refresh_from

    def _windows_batched(self, seqs: list[Sequence]) -> dict[int, int]:
        """Every window pass back to back, one transfer of all statistics to the host, then each sequence finds its
        first drifting range. The refresh passes overwrite every cache row the superseded window passes wrote, so
        caches, decisions and tokens equal the range-by-range order (one host sync per step on a GPU)."""
        backend, ranges = self.backend, self.backend.ranges
        passes = [self._window_pass(r, seqs) for r in range(len(ranges))]
        flat = backend.fetch([st for per_range in passes for st in per_range])
        refresh_from = {}
        for i, s in enumerate(seqs):
            window = [flat[r * len(seqs) + i] for r in range(len(ranges))]
            first = len(ranges)
            for r, stats in enumerate(window):
                trigger = s.policy.refresh_from(r, stats.drift)
                if trigger is not None:
                    first = trigger
                    break
            for r in range(first):
                s.policy.observe(ranges[r][0], window[r].colsum)
            refresh_from[id(s)] = first
        return refresh_from

    def _refreshes(self, seqs: list[Sequence], refresh_from: dict[int, int]) -> None:
        """Refresh each sequence's ranges from its first one on, in order; the sequences due at a range go
        together. Statistics come back in one transfer at the end."""
        backend, ranges = self.backend, self.backend.ranges
        calls = []
        for r in range(len(ranges)):
            due = [s for s in seqs if refresh_from[id(s)] <= r]
            if due:
                calls.append((r, due, backend.refresh_many(r, [s.caches for s in due], [s.targets.positions for s in due],
                                                           [s.key_is_mask for s in due])))
        flat = backend.fetch([st for _, _, stats in calls for st in stats])
        at = 0
        for r, due, _ in calls:
            for s in due:
                s.policy.observe(ranges[r][0], flat[at].colsum)
                at += 1
        for s in seqs:
            s.refreshed += sum(b - a for a, b in ranges[refresh_from[id(s)]:])


def _check_pair(policy: Policy, schedule) -> None:
    if policy.needs_blocks and not isinstance(schedule, BlockSchedule):
        raise ValueError(f"the {policy.name} cache follows Fast-dLLM's blocks: use the block schedule "
                         f"(--block-length), not the sliding window")
