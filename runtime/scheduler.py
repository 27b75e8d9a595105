"""Continuous batching: the one place that decides which requests run.

One thread decodes every running request together, one step at a time (Decoder.step: each request keeps its own
schedule, policy and refresh decisions, so its tokens equal decoding it alone). Between steps, requests that
finished, failed or whose caller went away leave, and waiting requests join in arrival order while fewer than
`max_batch` run and their caches fit the memory budget; a joining request's first step is its full pass. At most
`max_queue` requests wait (submit raises QueueFull beyond that). The Python API and the server share one
Scheduler per Engine.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .decoder import Decoder, Sequence


class Cancelled(Exception):
    """Raised inside a decoding whose caller went away."""


class QueueFull(Exception):
    """More requests are waiting than the scheduler's max_queue allows."""


@dataclass
class Request:
    prompt_ids: list[int]
    schedule: object
    policy: object
    cache_bytes: int                                 # what its caches need while it runs
    on_step: Callable | None = None                  # called with its canvas after each of its steps
    cancelled: Callable[[], bool] | None = None      # polled before each step: True ends it with Cancelled
    future: Future = field(default_factory=Future)
    seq: Sequence | None = None


class Scheduler:
    def __init__(self, decoder: Decoder, max_batch: int, memory_budget: int | None = None,
                 max_queue: int | None = None):
        """max_batch: requests decoded together at most; memory_budget: bytes their caches may take together
        (None: no bound; one request always runs); max_queue: waiting requests at most (None: no bound)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.decoder, self.max_batch, self.memory_budget, self.max_queue = decoder, max_batch, memory_budget, max_queue
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.steps = 0                      # decoding steps run (each advances every running request)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, prompt_ids: list[int], schedule, policy, cache_bytes: int = 0, on_step=None,
               cancelled=None) -> Future:
        """Queue one decoding; its Future gives the GenerationResult, or raises what ended it (Cancelled, ...)."""
        request = Request(list(prompt_ids), schedule, policy, cache_bytes, on_step, cancelled)
        with self._wake:
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="dllm-trt-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()
        return request.future

    # ---- the decoding thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running:
                    self._wake.wait()
                self._admit()
            self._drop_cancelled()
            if not self._running:
                continue
            seqs = [r.seq for r in self._running]
            try:
                self.decoder.step(seqs)
            except BaseException as e:   # a failing step fails the requests in it; the scheduler goes on
                for r in list(self._running):
                    self._end(r, error=e)
                continue
            self.steps += 1
            for r in list(self._running):
                try:
                    if r.on_step is not None:
                        r.on_step(r.seq.canvas)
                    if r.seq.done:
                        self._end(r, result=self.decoder.finish(r.seq))
                except BaseException as e:
                    self._end(r, error=e)

    def _admit(self) -> None:
        """Waiting requests join in arrival order while there is room (called with the lock held)."""
        used = sum(r.cache_bytes for r in self._running)
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting[0]
            if (self._running and self.memory_budget is not None
                    and used + request.cache_bytes > self.memory_budget):
                break   # first in, first out: no later request overtakes it
            self._waiting.popleft()
            if not request.future.set_running_or_notify_cancel():
                continue
            try:
                if request.cancelled is not None and request.cancelled():
                    raise Cancelled()
                request.seq = self.decoder.start(request.prompt_ids, request.schedule, request.policy)
            except BaseException as e:
                request.future.set_exception(e)
                continue
            self._running.append(request)
            used += request.cache_bytes

    def _drop_cancelled(self) -> None:
        for r in list(self._running):
            try:
                gone = r.cancelled is not None and r.cancelled()
            except BaseException as e:
                self._end(r, error=e)
                continue
            if gone:
                self._end(r, error=Cancelled())

    def _end(self, request: Request, result=None, error: BaseException | None = None) -> None:
        self._running.remove(request)
        self.decoder.release(request.seq)
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)
