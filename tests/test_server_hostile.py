"""The server under heavy or hostile requests (issue #21, round 2): prompts too large for the model are refused by
size before they are tokenized, so that many of them at once cannot stall /health; only application/json bodies are
taken (no cross-site form posts); rendering and tokenizing count against a per-request deadline; and whatever the
tokenizer raises, Rust panics included (pyo3's PanicException is a BaseException), the client gets an OpenAI-style
JSON error, never a plain-text 500."""
import concurrent.futures
import contextlib
import http.client
import json
import logging
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
from test_server import MODEL, free_port, running_server  # noqa: E402

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
# The tiny engine: 320 positions over a byte-level vocabulary whose longest non-special entry is 2 bytes (a byte
# spelled as one character of U+0100..U+0143), so no text over 640 bytes can fit.
POSITIONS, BYTE_LIMIT = 320, 640


class FakePanic(BaseException):
    """What pyo3 raises when Rust code panics (pyo3_runtime.PanicException derives from BaseException)."""


@pytest.fixture(scope="module")
def engines(tiny_engines, tmp_path_factory):
    return shutil.copytree(tiny_engines, tmp_path_factory.mktemp("hostile") / MODEL)


@pytest.fixture(scope="module")
def tiny_engine(engines):
    from dllm_trt.runtime.api import Engine

    return Engine.load(engines)


@pytest.fixture
def engine(tiny_engine):
    """An Engine of its own (over the shared backend and tokenizer), so that patching its methods stays local."""
    from dllm_trt.runtime.api import Engine

    e = Engine(tiny_engine.backend, tiny_engine.tokenizer, MODEL)
    assert e.max_positions == POSITIONS
    return e


@pytest.fixture
def encode_calls(engine, monkeypatch):
    """Records each prompt the engine is asked to tokenize."""
    calls, real = [], engine.encode

    def encode(prompt):
        calls.append(prompt)
        return real(prompt)

    monkeypatch.setattr(engine, "encode", encode)
    return calls


@contextlib.contextmanager
def served(app):
    """The app on loopback under uvicorn in a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def send(base, path, body=None, content_type="application/json", timeout=30):
    """(status, content type, raw body) of a GET (no body) or POST; body: bytes, or an object sent as JSON;
    content_type None sends no Content-Type header at all."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type and data is not None else {}
        conn.request("GET" if data is None else "POST", path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, r.getheader("content-type", ""), r.read()
    finally:
        conn.close()


def json_error(status, content_type, raw) -> dict:
    """The OpenAI-style error object of a response, checked for shape."""
    assert content_type.startswith("application/json"), (status, content_type, raw[:200])
    err = json.loads(raw)["error"]
    assert set(err) >= {"message", "type", "param", "code"} and "\n" not in err["message"]
    return err


# ---- 11: only JSON bodies ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded",            # an HTML form, or a fetch() with no preflight
    "multipart/form-data; boundary=xyz",
    "text/plain;charset=UTF-8",                     # fetch(url, {method: "POST", body: "..."})
    None,                                           # fetch() with an untyped Blob: no Content-Type at all
    "application/jsonfoo",
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_post_endpoints_take_only_json(engine, encode_calls, path, content_type):
    """A web page can post a form, text or an untyped blob to a local server without a CORS preflight; such bodies
    used to be parsed as JSON all the same. Now they get 415 before the body is parsed."""
    from dllm_trt.runtime.server import create_app

    body = GOOD if path == "/v1/chat/completions" else {"model": MODEL, "prompt": "hi", "max_tokens": 8}
    with served(create_app(engine)) as base:
        status, ctype, raw = send(base, path, body, content_type)
        assert status == 415, raw[:200]
        err = json_error(status, ctype, raw)
        assert "application/json" in err["message"] and err["type"] == "invalid_request_error"
        assert encode_calls == []
        for accepted in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            status, _, raw = send(base, path, body, accepted)
            assert status == 200, raw[:200]


# ---- 11: prompts that cannot fit are refused before tokenizing ------------------------------------------------------
@pytest.mark.parametrize("path,make,param", [
    ("/v1/completions", lambda text: {"model": MODEL, "prompt": text}, "prompt"),
    ("/v1/chat/completions", lambda text: {"model": MODEL, "messages": [{"role": "user", "content": text}]},
     "messages"),
    ("/v1/chat/completions", lambda text: {"model": MODEL, "messages": [{"role": "user", "content": text[:400]},
                                                                        {"role": "user", "content": text[400:]}]},
     "messages"),
])
def test_prompt_too_large_for_the_model_is_refused_before_tokenizing(engine, encode_calls, path, make, param):
    from starlette.testclient import TestClient

    from dllm_trt.runtime.server import create_app

    with TestClient(create_app(engine)) as c:
        for text in ("x" * (BYTE_LIMIT + 1), "\u00e9" * (BYTE_LIMIT // 2 + 1), "x" * 900_000):
            r = c.post(path, json=make(text))
            assert r.status_code == 400, r.text[:300]
            err = r.json()["error"]
            assert err["param"] == param and f"{BYTE_LIMIT} bytes" in err["message"], err
            assert str(POSITIONS) in err["message"]
        assert encode_calls == []
        # text that might fit (by bytes) is tokenized and then measured in tokens, as before
        r = c.post(path, json=make("x" * (BYTE_LIMIT - 8)))
        assert r.status_code == 413 and "tokens" in r.json()["error"]["message"] and len(encode_calls) == 1


def test_health_answers_while_large_prompts_arrive(engines):
    """8 concurrent 0.9 MB prompts (under the 1 MiB body limit) used to be tokenized, each holding the GIL for the
    whole call, and /health stalled for seconds. They are now refused by size; /health answers throughout (the
    target is under 100 ms; the bound here is loose for a loaded machine)."""
    text = "x" * 900_000
    bodies = [("/v1/completions", {"model": MODEL, "prompt": text}),
              ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]})] * 4
    with running_server(engines) as (base, _, _):
        send(base, "/health")
        stop, times = threading.Event(), []

        def poll():
            while not stop.is_set():
                t = time.monotonic()
                assert send(base, "/health", timeout=30)[0] == 200
                times.append(time.monotonic() - t)
                time.sleep(0.02)

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            health = pool.submit(poll)
            time.sleep(0.2)
            for _ in range(2):  # two waves
                answers = list(pool.map(lambda pb: send(base, *pb, timeout=60), bodies))
            time.sleep(0.2)
            stop.set()
            health.result()
    print(f"/health during the large prompts: {len(times)} answers, slowest {max(times) * 1000:.0f} ms")
    assert len(times) >= 5 and max(times) < 1.0, sorted(times)[-5:]
    for status, ctype, raw in answers:
        assert status == 400 and f"{BYTE_LIMIT} bytes" in json_error(status, ctype, raw)["message"]


# ---- 10: rendering and tokenizing count against the request ---------------------------------------------------------
def test_slow_prompt_preparation_is_cut_off_by_a_deadline(engine, monkeypatch):
    """A chat template or tokenizer that takes too long: the client gets an error when the deadline passes (400 for
    the request that was being prepared, 503 for one that waited its whole deadline behind it), /health answers
    meanwhile, and the server serves again once the slow work ends."""
    from dllm_trt.runtime.server import create_app

    release, real = threading.Event(), engine.encode

    def encode(prompt):
        if "slow" in json.dumps(prompt):
            release.wait(60)
        return real(prompt)

    monkeypatch.setattr(engine, "encode", encode)
    slow = {**GOOD, "messages": [{"role": "user", "content": "slow"}]}
    try:
        with served(create_app(engine, admit_timeout=1.0)) as base, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            t = time.monotonic()
            first = pool.submit(send, base, "/v1/chat/completions", slow)
            time.sleep(0.3)
            second = pool.submit(send, base, "/v1/chat/completions", GOOD)   # queued behind the slow one
            assert send(base, "/health", timeout=5)[0] == 200
            status, ctype, raw = first.result(timeout=30)
            assert status == 400 and "took longer than 1" in json_error(status, ctype, raw)["message"]
            status, ctype, raw = second.result(timeout=30)
            assert status == 503 and json_error(status, ctype, raw)["type"] == "server_busy"
            assert time.monotonic() - t < 20
            release.set()
            assert send(base, "/v1/chat/completions", GOOD)[0] == 200
    finally:
        release.set()


@pytest.mark.parametrize("stream", [False, True])
def test_value_error_from_rendering_is_400(engine, monkeypatch, stream):
    from starlette.testclient import TestClient

    from dllm_trt.runtime.server import create_app

    class RenderTooLarge(ValueError):
        pass

    def encode(prompt):
        raise RenderTooLarge("chat template: the rendered prompt exceeds 1000000 characters")

    monkeypatch.setattr(engine, "encode", encode)
    with TestClient(create_app(engine)) as c:
        r = c.post("/v1/chat/completions", json={**GOOD, "stream": stream})
    assert r.status_code == 400 and "exceeds 1000000 characters" in r.json()["error"]["message"]


# ---- 12: every error is JSON, panics included ---------------------------------------------------------------------
def panicking_tokenizer(tmp_path):
    """The tiny tokenizer with a pre-tokenizer regex that backtracks catastrophically: Oniguruma gives up and the
    tokenizers library panics (a real pyo3 PanicException) on a run of 'a' that does not end the text."""
    from dllm_trt.runtime.tokenizer import TextTokenizer

    from test_server import TINY

    spec = json.loads((TINY / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "^(a+)+$"}, "behavior": "Isolated",
                             "invert": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(TINY / "tokenizer_config.json", tmp_path)
    return TextTokenizer(tmp_path)


def test_tokenizer_panic_is_a_json_error(tiny_engine, tmp_path, caplog):
    from dllm_trt.runtime.api import Engine
    from dllm_trt.runtime.server import create_app

    caplog.set_level(logging.INFO, logger="dllm_trt.server")
    engine = Engine(tiny_engine.backend, panicking_tokenizer(tmp_path), MODEL)
    with served(create_app(engine)) as base:
        text = "a" * 40 + "!"
        for path, body in [("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 8}),
                           ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": text}]})]:
            status, ctype, raw = send(base, path, body)
            err = json_error(status, ctype, raw)
            # 500 with the request id while the tokenizer lets the panic out; 400 once it turns it into a ValueError
            assert status in (400, 500), raw
            if status == 500:
                assert err["type"] == "server_error" and "cmpl-" in err["message"]
        assert send(base, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 8})[0] == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_base_exception_while_preparing_is_500_with_request_id(engine, monkeypatch, caplog, path, stream):
    from dllm_trt.runtime.server import create_app

    def encode(prompt):
        raise FakePanic("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(engine, "encode", encode)
    caplog.set_level(logging.INFO, logger="dllm_trt.server")
    body = {**GOOD, "stream": stream} if "chat" in path else {"model": MODEL, "prompt": "hi", "stream": stream}
    with served(create_app(engine)) as base:
        status, ctype, raw = send(base, path, body)
        assert status == 500, raw[:200]
        err = json_error(status, ctype, raw)
        assert err["type"] == "server_error" and "unwrap" not in err["message"]
        rid = err["message"].split("(")[1].split(")")[0]
        assert rid.startswith("chatcmpl-" if "chat" in path else "cmpl-")
        assert send(base, "/health")[0] == 200
    logged = [r for r in caplog.records if r.name == "dllm_trt.server" and r.exc_info]
    assert len(logged) == 1 and rid in logged[0].getMessage()
    chain, exc = [], logged[0].exc_info[1]
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(isinstance(e, FakePanic) for e in chain)


@pytest.fixture
def panicking_head(engine, monkeypatch):
    """The model's head panics from its 4th call on: a decoding that fails after it started."""
    real, calls = engine.backend.head, []

    def head(targets):
        calls.append(1)
        if len(calls) > 3:
            raise FakePanic("device panic")
        return real(targets)

    monkeypatch.setattr(engine.backend, "head", head)
    return engine


def test_base_exception_while_decoding_is_a_json_error(panicking_head):
    """Used to be a plain-text 500, and a stream that never ended."""
    from dllm_trt.runtime.server import create_app

    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 48, "cache": "none", "window": 16, "threshold": 1.0}
    with served(create_app(panicking_head)) as base:
        status, ctype, raw = send(base, "/v1/completions", body, timeout=20)
        assert status == 500 and "cmpl-" in json_error(status, ctype, raw)["message"]
        status, ctype, raw = send(base, "/v1/completions", {**body, "stream": True}, timeout=20)
        assert status == 200 and ctype.startswith("text/event-stream")
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        last = json.loads(events[-1])
        assert last["error"]["type"] == "server_error" and "[DONE]" not in events


def test_unexpected_error_anywhere_is_json_with_an_id(engine, monkeypatch, caplog):
    """Outside the request handlers too (here /health): JSON with an id that the server log repeats."""
    from dllm_trt.runtime.server import create_app

    caplog.set_level(logging.INFO, logger="dllm_trt.server")
    for exc in (FakePanic("rust said no"), RuntimeError("python said no")):
        def describe(exc=exc):
            raise exc

        monkeypatch.setattr(engine.backend, "describe", describe)
        caplog.clear()
        with served(create_app(engine)) as base:
            status, ctype, raw = send(base, "/health")
        assert status == 500, raw[:200]
        err = json_error(status, ctype, raw)
        assert err["type"] == "server_error" and "said no" not in err["message"]
        rid = err["message"].split("(")[1].split(")")[0]
        assert any(r.exc_info and rid in r.getMessage() for r in caplog.records if r.name == "dllm_trt.server")
