"""OpenAI-compatible HTTP server (Starlette via FastAPI, served by uvicorn) over one Engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with stream=true as server-sent events in
OpenAI's chunk format), GET /v1/models, GET /health. Extra body fields: cache, gamma, window, threshold.

Streaming: a diffusion model commits tokens out of order, so only the longest committed prefix is final; each
event carries text that can no longer change. Requests are decoded one at a time per engine; at most `max_queue`
may wait, more get 503. A client that disconnects stops its decoding.
"""
import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .api import Cancelled, Engine, PromptTooLong



class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _field(body: dict, name: str, types, default=None, required=False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(422, f"'{name}' is required", name)
        return default
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = " or ".join(t.__name__ for t in _as_tuple(types))
        raise ApiError(422, f"'{name}' must be of type {names}, got {type(value).__name__}", name)
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def parse_request(body, engine: Engine, chat: bool) -> tuple[object, dict, bool]:
    """(prompt or messages, generation options, stream) from a request body, or ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", str, required=True)
    if model != engine.name:
        raise ApiError(404, f"model '{model}' does not exist (this server serves '{engine.name}')", "model",
                       "model_not_found")
    if chat:
        messages = _field(body, "messages", list, required=True)
        if not messages:
            raise ApiError(400, "'messages' must not be empty", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ApiError(422, f"messages[{i}] must be an object with string 'role' and 'content'", "messages")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = _field(body, "prompt", str, required=True)
        if not prompt.strip():
            raise ApiError(400, "'prompt' must not be empty", "prompt")
    max_tokens = _field(body, "max_tokens", int, None)
    max_tokens = _field(body, "max_completion_tokens", int, max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _field(body, "temperature", (int, float), 0)
    if temperature != 0:
        raise ApiError(400, "only greedy decoding is implemented: 'temperature' must be 0 or absent", "temperature")
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "'n' must be 1", "n")
    opts = {"max_tokens": max_tokens, "cache": _field(body, "cache", str), "gamma": _field(body, "gamma", (int, float)),
            "window": _field(body, "window", int), "threshold": _field(body, "threshold", (int, float))}
    stream = _field(body, "stream", bool, False)
    return prompt, opts, stream


def create_app(engine: Engine, max_queue: int = 16) -> FastAPI:
    app = FastAPI(title="dllm-trt", docs_url=None, redoc_url=None)
    executor = ThreadPoolExecutor(max_workers=max_queue + 1, thread_name_prefix="decode")
    state = {"active": 0}

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                            status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # never a traceback to the client
        return error(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "backend": engine.backend.describe(),
                "active_requests": state["active"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "dllm-trt"}]}

    def prepare(prompt, opts):
        """Validate everything that can fail before any response starts."""
        try:
            return engine.prepare(prompt, **opts)
        except PromptTooLong as e:
            raise ApiError(413, str(e), "max_tokens") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def handle(request: Request, chat: bool):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(ApiError(400, "the request body is not valid JSON"))
        try:
            prompt, opts, stream = parse_request(body, engine, chat)
            prepared = prepare(prompt, opts)
            if state["active"] >= max_queue:
                raise ApiError(503, f"server busy: {max_queue} requests already in progress; retry later",
                               kind="server_busy")
        except ApiError as e:
            return error(e)
        state["active"] += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def work():
            try:
                on_text = (lambda t: loop.call_soon_threadsafe(events.put_nowait, t)) if stream else None
                res = engine.generate(prompt, on_text=on_text, cancelled=stop.is_set, prepared=prepared)
                loop.call_soon_threadsafe(events.put_nowait, res)
                return res
            except BaseException as e:
                loop.call_soon_threadsafe(events.put_nowait, e)
                raise

        future = loop.run_in_executor(executor, work)
        future.add_done_callback(lambda _: state.__setitem__("active", state["active"] - 1))

        def usage(res):
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.tokens,
                    "total_tokens": res.prompt_tokens + res.tokens}

        def finish_reason(res):
            return res.finish_reason

        def chunk(delta: dict | None = None, text: str | None = None, reason=None, use=None):
            choice = ({"index": 0, "delta": delta or {}, "finish_reason": reason} if chat else
                      {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None})
            out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": engine.name, "choices": [choice]}
            if use is not None:
                out["usage"] = use
            return f"data: {json.dumps(out)}\n\n"

        if stream:
            async def sse():
                try:
                    if chat:
                        yield chunk({"role": "assistant", "content": ""})
                    while True:
                        item = await events.get()
                        if isinstance(item, str):
                            yield chunk({"content": item}, text=item)
                        elif isinstance(item, BaseException):
                            return
                        else:
                            yield chunk({}, text="", reason=finish_reason(item), use=usage(item))
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    stop.set()  # client gone or stream over: a decoding still running stops at its next step

            return StreamingResponse(sse(), media_type="text/event-stream")

        while not future.done():
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if not done and await request.is_disconnected():
                stop.set()
        try:
            res = future.result()
        except Cancelled:
            return error(ApiError(499, "client closed the request"))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                      "finish_reason": finish_reason(res)}
        else:
            choice = {"index": 0, "text": res.text, "finish_reason": finish_reason(res), "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": engine.name, "choices": [choice], "usage": usage(res),
                "dllm_trt": {"steps": res.steps, "seconds": res.seconds, "tokens_per_second": res.tokens_per_second,
                             "refresh_fraction": res.refresh_fraction, "cache": res.policy}}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 16) -> None:
    import uvicorn

    # uvicorn's graceful shutdown lets in-flight requests finish before the process exits
    uvicorn.run(create_app(engine, max_queue), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=300)
