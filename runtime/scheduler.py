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
        (None: no bound; one request always runs); max_queue: requests that may wait beyond the free places among
        the max_batch (None: no bound)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.decoder, self.max_batch, self.memory_budget, self.max_queue = decoder, max_batch, memory_budget, max_queue
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0                      # decoding steps run (each advances every running request)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """Whether requests submitted now would be decoded: not closed, and its thread (once started) running."""
        return not self._closed and (self._thread is None or self._thread.is_alive())

    def submit(self, prompt_ids: list[int], schedule, policy, cache_bytes: int = 0, on_step=None,
               cancelled=None) -> Future:
        """Queue one decoding; its Future gives the GenerationResult, or raises what ended it (Cancelled, ...).
        Raises QueueFull when max_queue requests already wait beyond the places free at the next step."""
        request = Request(list(prompt_ids), schedule, policy, cache_bytes, on_step, cancelled)
        with self._wake:
            if self._closed:
                raise RuntimeError("this scheduler is closed")
            free = max(0, self.max_batch - len(self._running))
            if self.max_queue is not None and len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name="dllm-trt-scheduler", daemon=True)
                thread.start()
                self._thread = thread
            self._waiting.append(request)
            self._wake.notify()
        return request.future

    def close(self) -> None:
        """No more requests: the decoding thread ends once those already submitted are done."""
        with self._wake:
            self._closed = True
            self._wake.notify()

    # ---- the decoding thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            with self._wake:
                while not self._waiting and not self._running:
                    if self._closed:
                        return
                    self._wake.wait()
                admitted = self._admit()
            for request in admitted:
                self._start(request)
            if not self._running:
                continue
            try:
                self.decoder.step([r.seq for r in self._running])
            except BaseException as e:   # a failing step fails the requests in it; the scheduler goes on
                for r in list(self._running):
                    self._end(r, error=e)
                continue
            self.steps += 1
            for r in list(self._running):
                try:
                    if r.seq.error is not None:   # this request could not take the step (the others did)
                        raise r.seq.error
                    if r.on_step is not None:
                        r.on_step(r.seq.canvas)
                    if r.seq.done:
                        self._end(r, result=self.decoder.finish(r.seq))
                except BaseException as e:
                    self._end(r, error=e)

    def _admit(self) -> list[Request]:
        """Waiting requests that join now, in arrival order while there is room (called with the lock held)."""
        used = sum(r.cache_bytes for r in self._running)
        admitted = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            request = self._waiting[0]
            if ((self._running or admitted) and self.memory_budget is not None
                    and used + request.cache_bytes > self.memory_budget):
                break   # first in, first out: no later request overtakes it
            self._waiting.popleft()
            if request.future.set_running_or_notify_cancel():
                admitted.append(request)
                used += request.cache_bytes
        return admitted

    def _start(self, request: Request) -> None:
        """Open a joining request's sequence (outside the lock: its caches are allocated here)."""
        try:
            request.seq = self.decoder.start(request.prompt_ids, request.schedule, request.policy)
        except BaseException as e:
            request.future.set_exception(e)
            return
        self._running.append(request)

    def _drop_cancelled(self) -> None:
        """Requests whose caller went away leave, running or waiting (their callables are polled without the lock:
        they are the callers' code)."""
        for r in list(self._running):
            gone = self._gone(r)
            if gone is not None:
                self._end(r, error=gone)
        with self._wake:
            waiting = list(self._waiting)
        for r in waiting:
            gone = self._gone(r)
            if gone is not None:
                with self._wake:
                    if r not in self._waiting:
                        continue
                    self._waiting.remove(r)
                if r.future.set_running_or_notify_cancel():
                    r.future.set_exception(gone)

    @staticmethod
    def _gone(request: Request) -> BaseException | None:
        """Cancelled() if the caller went away, the exception its check raised, else None."""
        try:
            return Cancelled() if request.cancelled is not None and request.cancelled() else None
        except BaseException as e:
            return e

    def _end(self, request: Request, result=None, error: BaseException | None = None) -> None:
        if request in self._running:
            self._running.remove(request)
        try:
            self.decoder.release(request.seq)
        except BaseException as e:   # the request ends either way; the scheduler must not
            error = error or e
        if request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)
