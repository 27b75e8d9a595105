"""The Python API: load once, generate many times.

    from dllm_trt.runtime.api import Engine
    engine = Engine.load("engines/NAME")                  # ONNX Runtime, or TensorRT when plans are built
    result = engine.generate("What is 7 plus 5?", cache="elastic", gamma=0.9, max_tokens=128)
    results = engine.generate_batch(["What is 7 plus 5?", "What is 3 times 4?"], max_tokens=128)
    for text in engine.stream([{"role": "user", "content": "Hi"}], max_tokens=64):
        print(text, end="")

Every decoding goes through the Engine's scheduler (runtime/scheduler.py): calls from several threads, and the
prompts of one generate_batch, are decoded together, up to `max_batch` at once, each with its own options and
the tokens it would get alone (its statistics may differ in the last bits: docs/BENCHMARKS.md section 16).
"""
from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import memory
from .backends.base import Backend
from .config import ModelError
from .decoder import Decoder, GenerationResult
from .manifest import MAX_BATCH_LIMIT
from .options import DecodeOptions, OptionError, PromptTooLong, build, decode_options
from .schedule import WindowSchedule
from .scheduler import Cancelled, QueueFull, Scheduler
from .tokenizer import TextTokenizer

__all__ = ["Engine", "Cancelled", "DecodeOptions", "OptionError", "PromptTooLong", "QueueFull", "RequestLimits"]

MEMORY_SHARE = 0.8   # of the memory free for caches at start-up, what the running requests' caches may take
DEFAULT_MAX_BATCH = 32   # requests decoded together (in piece calls of at most the engine's exported batch each)


@dataclass(frozen=True)
class RequestLimits:
    """What checking a request against an engine takes, without its weights: a front end that decodes elsewhere
    (runtime/ray_serve.py) refuses the same requests with the same errors as the engine itself."""
    max_positions: int                # prompt plus generation, at most
    default_gen_length: int | None    # the checkpoint's max_new_tokens
    calibration: dict                 # the engine's calibration block (its default gamma)
    max_active: int | None            # rows one piece call takes (None: no limit)

    def plan(self, prompt_ids: list[int], opts: DecodeOptions):
        """(schedule, policy) of a request: the generation length that fits (PromptTooLong), then the schedule and
        policy (OptionError)."""
        gen_length = opts.fit_gen_length(len(prompt_ids), self.max_positions, self.default_gen_length)
        schedule, policy = build(opts, gen_length, self.calibration)
        if self.max_active is not None and schedule.width > self.max_active:
            raise OptionError("window" if isinstance(schedule, WindowSchedule) else "block_length",
                              f"({schedule.width}) is more than the {self.max_active} rows one call of this engine's "
                              f"pieces takes (its export's --max-active)")
        return schedule, policy


def encode_prompt(tokenizer: TextTokenizer, prompt: str | list[dict]) -> list[int]:
    """A prompt's ids: a list of messages through the chat template, a string as plain text."""
    return tokenizer.encode_prompt(prompt, chat=isinstance(prompt, list))


def check_request(encode, limits: RequestLimits, prompt: str | list[dict], options: dict):
    """Engine.prepare's checks, for whatever encodes prompts and holds the engine's limits (the engine itself, or a
    front end that decodes elsewhere): (prompt ids, options, schedule, policy), or OptionError / PromptTooLong."""
    opts = decode_options(options)
    ids = encode(prompt)
    return ids, opts, *limits.plan(ids, opts)


class Engine:
    def __init__(self, backend: Backend, tokenizer: TextTokenizer, name: str, max_batch: int | None = None,
                 max_queue: int | None = None):
        """max_batch: requests decoded together at most (None: DEFAULT_MAX_BATCH; 1: one request at a time; the
        memory budget may admit fewer); max_queue: requests waiting beyond those (None: no bound; more raise
        QueueFull)."""
        tokenizer.check_embedding(backend.config.embedding_size)
        self.backend, self.tokenizer, self.name = backend, tokenizer, name
        self.max_positions = backend.config.max_sequence_length
        if hasattr(backend, "max_len"):  # exported engines cover fewer positions than the model may
            self.max_positions = min(self.max_positions, backend.max_len)
        if max_batch is not None and not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch must be in 1..{MAX_BATCH_LIMIT}, got {max_batch}")
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {max_queue}")
        # backends whose pieces take one sequence per call decode one request at a time: interleaving their steps
        # would gain nothing, and some keep caches per canvas length, not per request
        self.max_batch = 1 if backend.max_batch == 1 else (max_batch or DEFAULT_MAX_BATCH)
        free = backend.free_cache_memory()
        self.memory_budget = None if free is None else int(free * MEMORY_SHARE)
        self.scheduler = Scheduler(Decoder(backend, detokenize=tokenizer.decode), self.max_batch,
                                   self.memory_budget, max_queue)

    def close(self) -> None:
        """Stop the scheduler's thread once the requests already submitted are done (also when the Engine is
        dropped, or at the end of a `with Engine.load(...) as engine:` block)."""
        self.scheduler.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        scheduler = self.__dict__.get("scheduler")
        if scheduler is not None:
            scheduler.close()

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None, max_batch: int | None = None,
             max_queue: int | None = None) -> "Engine":
        """An exported engine directory (manifest.json), or a checkpoint directory with backend='torch'.
        `threads`: ONNX Runtime threads per piece (None: $DLLM_TRT_THREADS, else the physical cores); max_batch,
        max_queue: see __init__."""
        from .engine import open_checkpoint, open_engines

        path = Path(path)
        if (path / "manifest.json").is_file():
            be = open_engines(path, backend, threads)
        elif backend == "torch":
            be = open_checkpoint(path)
        else:
            raise ModelError(f"{path}: no manifest.json; export it first (dllm-trt export) or use backend='torch'")
        return cls(be, TextTokenizer(path), path.name, max_batch, max_queue)

    def sequence_bytes(self, n_positions: int | None = None) -> int:
        """What one running request's caches take at a canvas of n positions (default: the longest)."""
        be = self.backend
        return memory.canvas_bytes(be.config, be.activation_dtype, len(be.ranges), n_positions or self.max_positions)

    def sequences_that_fit(self) -> int | None:
        """Requests at the longest canvas whose caches fit the memory budget together (None: unknown)."""
        return None if self.memory_budget is None else max(1, self.memory_budget // self.sequence_bytes())

    def warmup(self) -> None:
        """Pay one-off costs (paging weights in, growing arenas) now instead of on the first request."""
        self.backend.warmup(self.max_positions)

    @property
    def weight_bytes(self) -> int | None:
        return self.backend.weight_bytes

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def prepare(self, prompt: str | list[dict], **options) -> tuple[Decoder, list[int], DecodeOptions]:
        """Validate the options (OptionError) and the prompt length (PromptTooLong), both ValueErrors, before any
        work starts. Options are DecodeOptions' fields; `max_tokens` (OpenAI's name) is accepted for gen_length,
        and None for any option means its default (for gamma: the engine's calibrated gamma, else 0.9)."""
        ids, opts, schedule, policy = check_request(self.encode, self.limits, prompt, options)
        return Decoder(self.backend, policy, schedule, self.tokenizer.decode), ids, opts

    @property
    def limits(self) -> RequestLimits:
        be = self.backend
        return RequestLimits(self.max_positions, be.config.default_gen_length, be.calibration, be.max_active)

    def plan(self, prompt_ids: list[int], opts: DecodeOptions) -> tuple[Decoder, list[int], DecodeOptions]:
        """prepare() for a prompt already encoded and options already validated (RequestLimits.plan's errors)."""
        schedule, policy = self.limits.plan(prompt_ids, opts)
        return Decoder(self.backend, policy, schedule, self.tokenizer.decode), prompt_ids, opts

    def status(self) -> dict:
        """This engine's part of the server's /health."""
        return {"backend": self.backend.describe(), "running": self.scheduler.running,
                "queued": self.scheduler.queued, "max_batch": self.max_batch, "weight_bytes": self.weight_bytes}

    def generate(self, prompt: str | list[dict], on_text=None, cancelled=None, prepared=None,
                 **options) -> GenerationResult:
        """Decode one prompt. on_text(delta) receives text as the committed prefix grows (from the scheduler's
        thread); cancelled() -> True stops the decoding with Cancelled. `prepared` is prepare()'s result, to skip
        doing that twice. Raises QueueFull when the scheduler's queue is full."""
        prepared = prepared or self.prepare(prompt, **options)
        stream = _PrefixStream(self.tokenizer, len(prepared[1]), self.backend.config, on_text)
        stop = threading.Event()   # set when this caller stops waiting (an interrupt): its decoding stops too
        future = self._submit(prepared, stream.update if on_text else None,
                              lambda: stop.is_set() or (cancelled is not None and cancelled()))
        try:
            result = future.result()
        except BaseException:
            stop.set()
            raise
        stream.finish(result.text)
        return result

    def generate_batch(self, prompts: list, **options) -> list[GenerationResult]:
        """Decode several prompts together (the same options for each); results in the prompts' order. Every prompt
        is checked (OptionError, PromptTooLong) before any decoding starts."""
        prepared = [self.prepare(p, **options) for p in prompts]
        stop = threading.Event()
        try:
            futures = [self._submit(p, None, stop.is_set) for p in prepared]
            return [f.result() for f in futures]
        except BaseException:
            stop.set()   # a failed submit or an interrupted caller leaves nothing decoding behind
            raise

    def _submit(self, prepared, on_step, cancelled):
        decoder, prompt_ids, _ = prepared
        n = len(prompt_ids) + decoder.schedule.gen_length
        # schedule and policy keep per-generation state: each submission gets its own, so one prepared request can
        # be decoded several times at once
        return self.scheduler.submit(prompt_ids, copy.deepcopy(decoder.schedule), copy.deepcopy(decoder.policy),
                                     self.sequence_bytes(n), on_step, cancelled)

    def stream(self, prompt: str | list[dict], **options) -> Iterator[str]:
        """Yield text pieces as they become final (the longest committed prefix); concatenated they equal
        generate(...).text."""
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def work():
            try:
                self.generate(prompt, on_text=q.put, cancelled=stop.is_set, **options)
                q.put(done)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := q.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


class _PrefixStream:
    """Turns canvas updates into text deltas that never change afterwards: only the prefix of committed tokens
    before the first still-MASK position (and before any end token) is final, since a diffusion model commits out of order."""

    def __init__(self, tokenizer, prompt_len: int, config, on_text):
        self.tokenizer, self.prompt_len, self.on_text = tokenizer, prompt_len, on_text
        self.stops = (config.mask_token_id, *config.end_ids)
        self.sent = ""

    def _emit(self, text: str) -> None:
        if self.on_text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def update(self, canvas) -> None:
        if self.on_text is None:
            return
        gen = canvas.ids[self.prompt_len:].tolist()
        stop = len(gen)
        for marker in self.stops:
            if marker in gen:
                stop = min(stop, gen.index(marker))
        text = self.tokenizer.decode(gen[:stop])
        self._emit(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence may still change

    def finish(self, final_text: str) -> None:
        self._emit(final_text)
