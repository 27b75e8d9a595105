"""OpenAI-compatible HTTP server (Starlette via FastAPI, served by uvicorn) over one Engine or several, picked by the
request's `model` (runtime/ray_serve.py runs this same app as Ray Serve's ingress, over engines that decode on
replicas).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with stream=true as server-sent events in
OpenAI's chunk format), GET /v1/models, GET /health. Extra body fields: the decoding options cache, gamma, window,
threshold, block_length, steps, track_num, early_stop (absent: the CLI's defaults; max_tokens absent: the checkpoint's
max_new_tokens, else 256, at most what fits).

Streaming: a diffusion model commits tokens out of order, so only the longest committed prefix is final; each
event carries text that can no longer change. An error during a streamed decoding is sent as an error event
(`data: {"error": {...}}`) and ends the stream without [DONE]. Requests are decoded together by the engine's
scheduler (continuous batching: up to the engine's max_batch at once, joining and leaving at step boundaries, each
with the tokens it would get alone); at most `max_queue` more may wait, beyond that 503. A client that
disconnects stops its decoding at its next step. /health reports the running and queued requests.

Hostile input: the POST endpoints take only `Content-Type: application/json` (415 otherwise, before the body is
read), so that a web page cannot post a form, text or an untyped blob to a local server without a CORS preflight.
Bodies over `max_body` bytes get 413 before they are read. Parsing, validation, chat rendering and tokenization run
off the event loop, one request at a time in one worker thread (so that at most one thread competes with the event
loop for the GIL), within a per-request deadline of `admit_timeout` seconds that counts the wait for that thread.
Text that cannot fit the model (more UTF-8 bytes than its positions times the longest token in its vocabulary) is
refused with 400 before it is tokenized. Every error is an OpenAI-style JSON body; an internal one is a 500 that
names a request id which the server log repeats with the traceback, whatever was raised (a Rust panic from the
tokenizers library is a BaseException).
"""
import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .api import Cancelled, Engine, OptionError, PromptTooLong, QueueFull
from .backends.base import RowLimit
from .options import DecodeOptions
from .config import ModelError
from .memory import peak_rss_bytes

DEFAULT_MAX_BODY = 1 << 20
MAX_QUEUE = 4096   # waiting requests at most: each holds a worker thread while it waits
DEFAULT_ADMIT_SECONDS = 30.0  # parsing, chat rendering and tokenization of one request, its wait for them included
log = logging.getLogger("dllm_trt.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class InternalFault(Exception):
    """A BaseException that is not an exit or a cancellation (a pyo3 PanicException from Rust code), carried as an
    Exception; the original is its __cause__."""


def is_fault(exc: BaseException) -> bool:
    """Whether exc is an error to answer with a 500, rather than an exit or a cancellation to let through."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_fault(e) for e in exc.exceptions)
    return not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError))


def internal_error(rid: str) -> ApiError:
    return ApiError(500, f"internal error ({rid}); see the server log", kind="server_error")


# ---- request bodies ----------------------------------------------------------------------------------------------
Int = Annotated[int, Field(le=2 ** 31 - 1)]


class _Body(BaseModel):
    # strict: "8" is not an int and 1 is not a bool; unknown OpenAI fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: str
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    temperature: float | None = None
    n: Int | None = None
    stream: bool | None = None
    # decoding options (runtime/options.py), as extra body fields
    cache: str | None = None
    gamma: float | None = None
    window: Int | None = None
    threshold: float | None = None
    block_length: Int | None = None
    steps: Int | None = None
    track_num: Int | None = None
    early_stop: bool | None = None


# the body fields that are decoding options (the extra fields above), by their DecodeOptions names
DECODING_FIELDS = tuple(name for name in _Body.model_fields if name in DecodeOptions.__dataclass_fields__)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str


class ChatBody(_Body):
    messages: list[Message]


class CompletionBody(_Body):
    prompt: str


_TYPE_NAMES = {"int_type": "int", "string_type": "str", "bool_type": "bool", "list_type": "list",
               "float_type": "number", "model_type": "object", "dict_type": "object", "model_attributes_type": "object",
               "int_from_float": "int"}


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(e: ValidationError) -> ApiError:
    """The first problem in pydantic's report, as one line in this server's words."""
    err = e.errors(include_url=False)[0]
    name, kind, got = _loc(err["loc"]), err["type"], err.get("input")
    if kind == "missing":
        return ApiError(422, f"'{name}' is required", name)
    if kind in ("float_type", "int_type") and isinstance(got, int) and not isinstance(got, bool):
        return ApiError(400, f"'{name}' is out of range", name)
    if kind in _TYPE_NAMES:
        return ApiError(422, f"'{name}' must be of type {_TYPE_NAMES[kind]}, got {type(got).__name__}", name)
    if kind == "less_than_equal":
        return ApiError(400, f"'{name}' is out of range", name)
    return ApiError(422, f"'{name}': {err['msg']}", name)


def one_line(text: str, limit: int = 1000) -> str:
    """Messages can echo what a client sent: keep them to one line of bounded length."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "... (truncated)"


def error_body(e: ApiError) -> dict:
    return {"error": {"message": one_line(e.message), "type": e.kind, "param": e.param, "code": None}}


def _no_constants(name):
    raise ValueError(f"{name} is not allowed")


def parse_json(raw: bytes):
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at position {e.pos}") from None
    except ValueError as e:  # not UTF-8, NaN/Infinity, an integer with thousands of digits
        raise ApiError(400, f"the request body is not valid JSON: {str(e).splitlines()[0]}") from None


def parse_request(body, engines: dict, chat: bool) -> tuple[object, object, dict, bool]:
    """(the engine named by 'model', prompt or messages, generation options, stream) from a parsed JSON body, or
    ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = (ChatBody if chat else CompletionBody).model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    engine = engines.get(req.model)
    if engine is None:
        served = ", ".join(f"'{name}'" for name in engines)
        raise ApiError(404, f"model {req.model[:100]!r} does not exist (this server serves {served})", "model",
                       "model_not_found")
    if chat:
        if not req.messages:
            raise ApiError(400, "'messages' must not be empty", "messages")
        prompt = [{"role": m.role, "content": m.content} for m in req.messages]
    else:
        if not req.prompt.strip():
            raise ApiError(400, "'prompt' must not be empty", "prompt")
        prompt = req.prompt
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    if req.temperature not in (None, 0):
        raise ApiError(400, "only greedy decoding is implemented: 'temperature' must be 0 or absent", "temperature")
    if req.n not in (None, 1):
        raise ApiError(400, "'n' must be 1", "n")
    # absent fields stay None: the options factory fills in the same defaults as every other entry point
    opts = {"max_tokens": max_tokens, **{name: getattr(req, name) for name in DECODING_FIELDS}}
    return engine, prompt, opts, bool(req.stream)


def longest_token_bytes(engine: Engine) -> int | None:
    """The most UTF-8 bytes of a client's text that one token can stand for: the longest vocabulary entry that is not
    a special token (text a client sends never becomes one). Byte-level and SentencePiece vocabularies spell a byte
    or a space with more bytes than it stands for, so this errs on the high side. None (no bound) where one token
    can stand for any amount of text, an unknown-token run (WordPiece, WordLevel, Unigram, BPE with fuse_unk), or
    where the tokenizer is not a tokenizers-library one."""
    tok = getattr(getattr(engine, "tokenizer", None), "tokenizer", None)
    try:
        model = json.loads(tok.to_str()).get("model") or {}
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        vocab = tok.get_vocab(with_added_tokens=True)
    except Exception as e:  # no bound is the safe default
        log.warning("no prompt size bound: the tokenizer's vocabulary cannot be read (%s)", one_line(str(e), 200))
        return None
    unknown = (model.get("unk_token") is not None or model.get("unk_id") is not None) and not model.get("byte_fallback")
    if unknown and (model.get("type") != "BPE" or model.get("fuse_unk")):
        return None
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab if t not in special), default=1)
    return max(longest, 4 if unknown else 1)  # an unknown character (at most 4 bytes) is one token


def text_bytes(prompt: str | list[dict]) -> int:
    """UTF-8 bytes of the text a client sent: the prompt, or every string of every message."""
    texts = [prompt] if isinstance(prompt, str) else [v for m in prompt for v in m.values() if isinstance(v, str)]
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def check_text_size(prompt: str | list[dict], positions: int, token_bytes: int) -> None:
    """ApiError 400 for text that cannot fit the model's positions whatever it tokenizes to: refused by its size
    alone, before a tokenizer spends seconds on it."""
    size, limit = text_bytes(prompt), positions * token_bytes
    if size > limit:
        field = "prompt" if isinstance(prompt, str) else "messages"
        raise ApiError(400, f"'{field}' is {size} bytes of text, more than this model can take: {positions} positions "
                            f"hold at most {limit} bytes (its longest token is {token_bytes} bytes)", field)


def require_json(request: Request) -> None:
    """415 for a body that is not declared JSON. Forms, text and untyped blobs are what a web page may post to any
    address without a CORS preflight; application/json needs one, which this server does not grant."""
    declared = request.headers.get("content-type")
    if (declared or "").split(";", 1)[0].strip().lower() != "application/json":
        got = "no Content-Type" if declared is None else f"Content-Type {declared[:100]!r}"
        raise ApiError(415, f"the request body must be sent as Content-Type: application/json (got {got})")


async def read_body(request: Request, max_body: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be too large: from Content-Length before reading
    anything, else while counting the bytes as they arrive."""
    too_large = ApiError(413, f"the request body exceeds this server's limit of {max_body} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise too_large
    return bytes(body)


def json_faults(app):
    """ASGI middleware: anything raised past the handlers before a response started, BaseExceptions such as a Rust
    panic included, becomes a JSON 500 naming an id that the log repeats with the traceback. Exits and cancellations
    pass through; so does an error after the response started (the server then closes the connection)."""
    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, tracked)
        except BaseException as e:
            if started or not is_fault(e):
                raise
            rid = f"req-{uuid.uuid4().hex[:24]}"
            log.error("%s: unexpected error in %s %s", rid, scope.get("method"), scope.get("path"),
                      exc_info=(type(e), e, e.__traceback__))
            await JSONResponse(error_body(internal_error(rid)), status_code=500)(scope, receive, send)

    return guarded


def error_response(e: ApiError, request: Request | None = None) -> JSONResponse:
    """e as an OpenAI-style JSON response; a client's error (given its request) also gets one line in the log."""
    if request is not None and e.status < 500:
        log.info("%d %s %s: %s", e.status, request.method, request.url.path, one_line(e.message))
    return JSONResponse(error_body(e), status_code=e.status)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods, in the same error format."""
    return error_response(ApiError(exc.status_code, str(exc.detail)), request)


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A backstop behind json_faults: never a traceback to the client."""
    rid = f"req-{uuid.uuid4().hex[:24]}"
    log.error("%s: unexpected error in %s %s", rid, request.method, request.url.path,
              exc_info=(type(exc), exc, exc.__traceback__))
    return error_response(internal_error(rid))


class Unavailable(Exception):
    """A decoding lost for a reason outside the request (the replica decoding it stopped): 503, retry."""


def decoding_failed(rid: str, exc: BaseException) -> ApiError:
    """The answer to a decoding that ended with `exc`: the request's own fault (options too large for the engine)
    400, a full queue or a lost replica 503, anything else a logged 500."""
    if isinstance(exc, RowLimit):
        return ApiError(400, str(exc))
    if isinstance(exc, QueueFull):
        return ApiError(503, "server busy: the decoding queue is full; retry later", kind="server_busy")
    if isinstance(exc, Unavailable):
        log.warning("%s: %s", rid, exc)
        return ApiError(503, f"{exc}; retry", kind="server_busy")
    log.error("%s: decoding failed", rid, exc_info=(type(exc), exc, exc.__traceback__))
    return internal_error(rid)


def usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.tokens,
            "total_tokens": res.prompt_tokens + res.tokens}


@dataclass
class Reply:
    """What every response body for one request shares."""
    id: str
    chat: bool
    created: int
    model: str

    def chunk(self, delta: dict | None = None, text: str | None = None, reason=None, use=None) -> str:
        """One server-sent event in OpenAI's chunk format."""
        choice = ({"index": 0, "delta": delta or {}, "finish_reason": reason} if self.chat else
                  {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None})
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if use is not None:
            out["usage"] = use
        return f"data: {json.dumps(out)}\n\n"

    def completion(self, res) -> dict:
        """The whole response body of a request that did not stream."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                      "finish_reason": res.finish_reason}
        else:
            choice = {"index": 0, "text": res.text, "finish_reason": res.finish_reason, "logprobs": None}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": usage(res),
                "dllm_trt": {"steps": res.steps, "seconds": res.seconds, "tokens_per_second": res.tokens_per_second,
                             "refresh_fraction": res.refresh_fraction, "cache": res.policy,
                             **({} if res.replica is None else {"replica": res.replica})}}


@dataclass
class Decoding:
    """One request's decoding in a worker thread. It puts events on the event loop's queue: text as it becomes final
    (when streaming), then the result or the exception it failed with. Setting `stop` ends it at its next step."""
    engine: Engine
    prompt: object
    prepared: object
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None  # run()'s, once started

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def run(self):
        """The result, or the exception it failed with (returned, so that an unread future never logs it). Any
        BaseException: a Rust panic while decoding text must end the stream too, and nothing raised in a worker thread
        could stop the process anyway."""
        try:
            res = self.engine.generate(self.prompt, on_text=self.send if self.stream else None,
                                       cancelled=self.stop.is_set, prepared=self.prepared)
        except BaseException as e:
            res = e
        self.send(res)
        return res


async def stream_events(reply: Reply, decoding: Decoding):
    """The server-sent events of a streamed request, until the result, an error event, or the client leaving."""
    finished = False
    try:
        if reply.chat:
            yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            item = await decoding.events.get()
            if isinstance(item, str):
                yield reply.chunk({"content": item}, text=item)
            elif isinstance(item, BaseException):
                e = decoding_failed(reply.id, item)
                finished = True
                yield f"data: {json.dumps(error_body(e))}\n\n"
                return
            else:
                finished = True
                yield reply.chunk({}, text="", reason=item.finish_reason, use=usage(item))
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:
            log.info("%s: client disconnected; decoding stopped", reply.id)
        decoding.stop.set()  # client gone or stream over: a decoding still running stops at its next step


async def complete(request: Request, reply: Reply, decoding: Decoding):
    """The response to a request that did not stream, once its decoding ends; a client that leaves stops it."""
    future = decoding.future
    while not future.done():
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if not done and await request.is_disconnected():
            decoding.stop.set()
    res = future.result()
    if isinstance(res, Cancelled):
        log.info("%s: client disconnected; decoding stopped", reply.id)
        return error_response(ApiError(499, "client closed the request"))
    if isinstance(res, BaseException):
        return error_response(decoding_failed(reply.id, res))
    return reply.completion(res)


@dataclass
class Server:
    """What the handlers share: the engines by model name, their limits, the two thread pools, and the requests in
    progress. An engine is an Engine, or anything with its name, max_positions, max_batch, tokenizer, prepare,
    generate and status (runtime/ray_serve.py's RemoteEngine, which decodes on Ray Serve replicas). The route methods
    carry no docstrings or return annotations: FastAPI would put those into /openapi.json and the response
    handling."""
    engines: dict
    max_queue: int           # per model: requests that may wait while its max_batch decode
    max_body: int
    admit_timeout: float
    token_bytes: dict        # per model, the longest token's UTF-8 bytes: prompts over positions times this are refused unread
    decoder: ThreadPoolExecutor
    # One thread prepares requests (parse, render, tokenize: mostly work that holds the GIL): more would only take
    # turns at the GIL with each other and with the event loop, and stretch every /health answer.
    admitter: ThreadPoolExecutor
    active: dict = field(default_factory=dict)  # per model: requests admitted and not yet finished

    async def health(self):
        models = [{"model": name, "active_requests": self.active[name], **engine.status()}
                  for name, engine in self.engines.items()]
        # one model: its fields at the top level too, as before several could be served
        return {"status": "ok", **(models[0] if len(models) == 1 else {}), "max_queue": self.max_queue,
                "peak_rss_bytes": peak_rss_bytes(), "models": models}

    async def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dllm-trt"}
                                           for name in self.engines]}

    async def chat_completions(self, request: Request):
        return await self.respond(request, chat=True)

    async def completions(self, request: Request):
        return await self.respond(request, chat=False)

    def admit(self, raw: bytes, chat: bool, began: list):
        """Parse, validate, render and tokenize: everything that can fail before any response starts. Runs in the
        admitting thread, so a large or hostile body never stalls the event loop; `began` gets the start time."""
        began.append(time.monotonic())
        try:
            engine, prompt, opts, stream = parse_request(parse_json(raw), self.engines, chat)
            if self.token_bytes[engine.name] is not None:
                check_text_size(prompt, engine.max_positions, self.token_bytes[engine.name])
            return engine, prompt, engine.prepare(prompt, **opts), stream
        except PromptTooLong as e:
            raise ApiError(413, str(e).replace("gen length", "max_tokens"), "max_tokens") from None
        except OptionError as e:  # named as the request field is
            field = "max_tokens" if e.field == "gen_length" else e.field
            raise ApiError(400, f"'{field}' {e.problem}", field) from None
        except (ValueError, ModelError) as e:  # bad options, a chat template that refuses, text that is not text
            raise ApiError(400, str(e)) from None
        except Exception:
            raise
        except BaseException as e:  # a Rust panic (pyo3's PanicException) from the tokenizers library, say
            if not is_fault(e):
                raise
            raise InternalFault(f"{type(e).__name__} while preparing the request") from e

    async def admitted(self, raw: bytes, chat: bool):
        """admit()'s result within the deadline, which counts the wait for the admitting thread. Past it the client
        gets 400 if its own preparation ran for most of that time (a chat template or tokenizer too slow for this
        input: retrying would not help), else 503; the thread finishes its work unobserved (it cannot be stopped)."""
        began: list = []
        future = asyncio.get_running_loop().run_in_executor(self.admitter, self.admit, raw, chat, began)
        try:
            return await asyncio.wait_for(future, self.admit_timeout)
        except asyncio.TimeoutError:
            if began and time.monotonic() - began[0] >= self.admit_timeout / 2:
                raise ApiError(400, f"preparing the prompt (chat template and tokenizer) took longer than "
                                    f"{self.admit_timeout:g} s") from None
            raise ApiError(503, f"server busy: the request could not be prepared within {self.admit_timeout:g} s; "
                                f"retry later", kind="server_busy") from None

    async def accept(self, request: Request, chat: bool):
        """(engine, prompt, prepared, stream) of a request this server takes on, or ApiError."""
        require_json(request)
        raw = await read_body(request, self.max_body)
        engine, prompt, prepared, stream = await self.admitted(raw, chat)
        # no await between this check and start_decoding() counting the request: the queue bound holds
        if self.active[engine.name] >= engine.max_batch + self.max_queue:
            raise ApiError(503, f"server busy: {engine.max_batch} requests decoding and {self.max_queue} "
                                f"waiting; retry later", kind="server_busy")
        return engine, prompt, prepared, stream

    def start_decoding(self, engine, prompt, prepared, stream: bool) -> Decoding:
        self.active[engine.name] += 1
        loop = asyncio.get_running_loop()
        decoding = Decoding(engine, prompt, prepared, stream, loop)
        decoding.future = loop.run_in_executor(self.decoder, decoding.run)
        decoding.future.add_done_callback(lambda _: self.finished(engine.name))
        return decoding

    def finished(self, name: str) -> None:
        self.active[name] -= 1

    async def respond(self, request: Request, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            engine, prompt, prepared, stream = await self.accept(request, chat)
        except ApiError as e:
            return error_response(e, request)
        except ClientDisconnect:
            log.info("%s %s: client disconnected while sending the body", request.method, request.url.path)
            return error_response(ApiError(499, "client closed the request"))
        except Exception:
            log.exception("%s: unexpected error while admitting the request", rid)
            return error_response(internal_error(rid))
        decoding = self.start_decoding(engine, prompt, prepared, stream)
        reply = Reply(rid, chat, created=int(time.time()), model=engine.name)
        if stream:
            return StreamingResponse(stream_events(reply, decoding), media_type="text/event-stream")
        return await complete(request, reply, decoding)


def create_app(engines, max_queue: int = 16, max_body: int = DEFAULT_MAX_BODY,
               admit_timeout: float = DEFAULT_ADMIT_SECONDS) -> FastAPI:
    """engines: one Engine, or several (a request's 'model' picks one by name); max_queue: requests that may wait
    while an engine decodes its max_batch (more get 503)."""
    if not 0 <= max_queue <= MAX_QUEUE:
        raise ValueError(f"max_queue must be in 0..{MAX_QUEUE}, got {max_queue}")
    if max_body < 1:
        raise ValueError(f"max_body must be at least 1, got {max_body}")
    if not admit_timeout > 0:
        raise ValueError(f"admit_timeout must be positive, got {admit_timeout}")
    engines = [engines] if isinstance(engines, Engine) else list(engines)
    names = [e.name for e in engines]
    if not engines or len(set(names)) < len(names):
        raise ValueError(f"create_app needs engines with distinct names, got {names}")
    app = FastAPI(title="dllm-trt", docs_url=None, redoc_url=None)
    app.add_middleware(json_faults)
    server = Server({e.name: e for e in engines}, max_queue, max_body, admit_timeout,
                    token_bytes={e.name: longest_token_bytes(e) for e in engines},  # once, at start-up
                    # one thread per request in progress, waiting for the scheduler (which does the decoding)
                    decoder=ThreadPoolExecutor(max_workers=sum(e.max_batch + max_queue for e in engines) + 1,
                                               thread_name_prefix="decode"),
                    admitter=ThreadPoolExecutor(max_workers=1, thread_name_prefix="admit"),
                    active={e.name: 0 for e in engines})
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/completions")(server.completions)
    return app


def log_requests() -> None:
    """One line per rejected request or disconnect on stderr; tracebacks only for server faults."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def serve(engines, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 16,
          max_body: int = DEFAULT_MAX_BODY, admit_timeout: float = DEFAULT_ADMIT_SECONDS) -> None:
    """engines: one Engine or several (see create_app)."""
    import uvicorn

    app = create_app(engines, max_queue, max_body, admit_timeout)  # ValueError on bad limits, before anything starts
    log_requests()
    for engine in [engines] if isinstance(engines, Engine) else engines:
        engine.warmup()  # before /health answers: the first request must not pay for it
    # uvicorn's graceful shutdown lets in-flight requests finish before the process exits
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=300)
