"""The OpenAI-compatible server, started on loopback in a subprocess and used through the real openai client."""
import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from dllm_trt.export.onnx_export import export_model

openai = pytest.importorskip("openai")
MODEL = "tiny_srv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    engines = tmp_path_factory.mktemp("srv") / MODEL
    export_model(tiny_dir, engines, layers_per_range=2, max_len=160, max_active=64, quiet=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "serve", "--engines", str(engines), "--port",
                             str(port), "--max-queue", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.2)
    yield base, proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_completion_and_stream_agree(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=24)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert 0 < full.usage.completion_tokens <= 24 and full.usage.prompt_tokens > len("Hello there")
    assert full.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) >= 2, "the stream should deliver text in several pieces"


def test_completion_with_extra_fields(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=32)
    dual = client.completions.create(extra_body={"cache": "dual", "threshold": 0.5}, **kw)
    none = client.completions.create(extra_body={"cache": "none"}, **kw)
    assert dual.choices[0].text and none.choices[0].text
    assert dual.usage.prompt_tokens == len("Once upon a time".encode())  # byte tokenizer: one token per byte
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, extra_body={"cache": "none"},
                                                                          **kw))
    assert streamed == none.choices[0].text


def test_concurrent_requests_equal_solo_runs(client):
    prompts = [f"request number {i} says hello" for i in range(32)]

    def ask(p):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=16, extra_body={"cache": "elastic"})
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, prompts))
    alone = [ask(p) for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1


def post(base, path, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/chat/completions", {**GOOD, "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
    ("/v1/chat/completions", {k: v for k, v in GOOD.items() if k != "messages"}, 422, "'messages' is required"),
    ("/v1/chat/completions", {**GOOD, "messages": "hi"}, 422, "'messages' must be of type list"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user"}]}, 422, "messages[0] must be an object"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": -5}, 400, "'max_tokens' must be at least 1"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": "8"}, 422, "'max_tokens' must be of type int"),
    ("/v1/chat/completions", {**GOOD, "gamma": 7}, 400, "gamma must be in [-1, 2]"),
    ("/v1/chat/completions", {**GOOD, "cache": "magic"}, 400, "cache must be one of"),
    ("/v1/chat/completions", {**GOOD, "temperature": 0.7}, 400, "only greedy decoding"),
    ("/v1/chat/completions", {**GOOD, "stream": "yes"}, 422, "'stream' must be of type bool"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "x" * 200}]}, 413, "exceeds"),
    ("/v1/completions", {"model": MODEL, "prompt": "   "}, 400, "'prompt' must not be empty"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 422, "'prompt' must be of type str"),
])
def test_malformed_requests(server, path, body, status, message):
    code, payload = post(server[0], path, body, raw=isinstance(body, bytes))
    assert code == status, payload
    assert message in payload["error"]["message"]
    # and the server keeps serving
    assert post(server[0], "/v1/chat/completions", GOOD)[0] == 200


def test_health(server):
    with urllib.request.urlopen(server[0] + "/health", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_full_queue_answers_503(tiny_dir, tmp_path):
    engines = tmp_path / MODEL
    export_model(tiny_dir, engines, layers_per_range=4, max_len=300, max_active=64, quiet=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "serve", "--engines", str(engines), "--port",
                             str(port), "--max-queue", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 256, "cache": "none",
                "threshold": 1.0}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = [c for c, _ in pool.map(lambda _: post(base, "/v1/completions", body), range(6))]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        assert post(base, "/v1/completions", {**body, "max_tokens": 8})[0] == 200   # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cancelled_decoding_stops_and_frees_the_engine(tiny_dir, tmp_path):
    """What a client disconnect triggers: the decoding stops at its next step and the engine serves the next one."""
    from dllm_trt.runtime.api import Cancelled, Engine

    export_model(tiny_dir, tmp_path / MODEL, layers_per_range=4, max_len=160, max_active=64, quiet=True)
    engine = Engine.load(tmp_path / MODEL)
    checks = []

    def cancelled():
        checks.append(1)
        return len(checks) > 3

    with pytest.raises(Cancelled):
        engine.generate("a long story", cancelled=cancelled, max_tokens=96, threshold=1.0, cache="none")
    assert len(checks) == 4        # stopped at the 4th step instead of running ~96
    stream = engine.stream("a long story", max_tokens=96, threshold=1.0, cache="none")
    next(stream)
    stream.close()                 # the consumer goes away after the first piece
    full = engine.generate("a long story", max_tokens=96, threshold=1.0, cache="none")
    assert full.steps > 4 and full.text
