"""The Python API: load once, generate many times.

    from dllm_trt.runtime.api import Engine
    engine = Engine.load("engines/NAME")                  # ONNX Runtime, or TensorRT when plans are built
    result = engine.generate("What is 7 plus 5?", cache="elastic", gamma=0.9, max_tokens=128)
    for text in engine.stream([{"role": "user", "content": "Hi"}], max_tokens=64):
        print(text, end="")

One decoding runs at a time per Engine (a lock serialises callers), so an Engine can be shared by server threads.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from .backends.base import Backend
from .config import ModelError
from .decoder import Decoder, GenerationResult
from .options import DecodeOptions, OptionError, PromptTooLong, build, decode_options
from .tokenizer import TextTokenizer

__all__ = ["Engine", "Cancelled", "DecodeOptions", "OptionError", "PromptTooLong"]


class Cancelled(Exception):
    """Raised inside a decoding whose caller went away."""


class Engine:
    def __init__(self, backend: Backend, tokenizer: TextTokenizer, name: str):
        tokenizer.check_embedding(backend.config.embedding_size)
        self.backend, self.tokenizer, self.name = backend, tokenizer, name
        self.max_positions = backend.config.max_sequence_length
        if hasattr(backend, "max_len"):  # exported engines cover fewer positions than the model may
            self.max_positions = min(self.max_positions, backend.max_len)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None) -> "Engine":
        """An exported engine directory (manifest.json), or a checkpoint directory with backend='torch'.
        `threads`: ONNX Runtime threads per piece (None: $DLLM_TRT_THREADS, else the physical cores)."""
        from .engine import open_checkpoint, open_engines

        path = Path(path)
        if (path / "manifest.json").is_file():
            be = open_engines(path, backend, threads)
        elif backend == "torch":
            be = open_checkpoint(path)
        else:
            raise ModelError(f"{path}: no manifest.json; export it first (dllm-trt export) or use backend='torch'")
        return cls(be, TextTokenizer(path), path.name)

    def warmup(self) -> None:
        """Pay one-off costs (paging weights in, growing arenas) now instead of on the first request."""
        self.backend.warmup(self.max_positions)

    @property
    def weight_bytes(self) -> int | None:
        return self.backend.weight_bytes

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return self.tokenizer.encode_prompt(prompt, chat=isinstance(prompt, list))

    def prepare(self, prompt: str | list[dict], **options) -> tuple[Decoder, list[int], DecodeOptions]:
        """Validate the options (OptionError) and the prompt length (PromptTooLong), both ValueErrors, before any
        work starts. Options are DecodeOptions' fields; `max_tokens` (OpenAI's name) is accepted for gen_length,
        and None for any option means its default (for gamma: the engine's calibrated gamma, else 0.9)."""
        opts = decode_options(options)
        return self.plan(self.encode(prompt), opts)

    def plan(self, prompt_ids: list[int], opts: DecodeOptions) -> tuple[Decoder, list[int], DecodeOptions]:
        """prepare() for a prompt already encoded and options already validated: the generation length that fits
        (PromptTooLong), then the schedule and policy (OptionError)."""
        gen_length = opts.fit_gen_length(len(prompt_ids), self.max_positions,
                                          self.backend.config.default_gen_length)
        schedule, policy = build(opts, gen_length, self.backend.calibration)
        return Decoder(self.backend, policy, schedule, self.tokenizer.decode), prompt_ids, opts

    def generate(self, prompt: str | list[dict], on_text=None, cancelled=None, prepared=None,
                 **options) -> GenerationResult:
        """Decode one prompt. on_text(delta) receives text as the committed prefix grows; cancelled() -> True
        stops the decoding with Cancelled. `prepared` is prepare()'s result, to skip doing that twice."""
        decoder, prompt_ids, opts = prepared or self.prepare(prompt, **options)
        stream = _PrefixStream(self.tokenizer, len(prompt_ids), self.backend.config, on_text)

        def on_step(canvas):
            if cancelled is not None and cancelled():
                raise Cancelled()
            stream.update(canvas)

        with self._lock:
            result = decoder.generate(prompt_ids, on_step=on_step)
        stream.finish(result.text)
        return result

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
