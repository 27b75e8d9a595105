"""`dllm-trt serve --ray`: two Ray Serve replicas of the bundled engine behind the same OpenAI app, compared with the
single-process server's app (the independent side here: no Ray, one Engine in this process)."""
import collections
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
REPLICA_PROCESS = "ServeReplica:dllm-trt:model-"   # Ray titles a replica's process with its app and deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_pids(root: int) -> list[int]:
    """The replica processes below process `root` (the Ray instance that serve --ray started is its child)."""
    parent, title = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(stat.parent.name)
            parent[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            title[pid] = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
    below = {root}
    for _ in range(8):   # the tree is shallow: serve, raylet, workers
        below |= {pid for pid, ppid in parent.items() if ppid in below}
    return sorted(pid for pid in below if REPLICA_PROCESS in title.get(pid, ""))


def questions(n: int) -> list[str]:
    lines = (ROOT / "data" / "arith_heldout.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["question"] for line in lines]


class Texted:
    """How many streams have received text so far."""

    def __init__(self):
        self.streams, self.lock = set(), threading.Lock()

    def add(self, i: int) -> None:
        with self.lock:
            self.streams.add(i)

    def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.streams) < n and time.monotonic() < deadline:
            time.sleep(0.01)


def ask(client, model: str, i: int, question: str, stream=False, texted: Texted | None = None, **extra):
    """Request i: chat on even i, completion on odd i, streamed when `stream` (`texted` counts it once it received
    text). (replica or 'stream', text), or ('error', status code, error type) for an OpenAI error."""
    def joined(deltas):
        text = ""
        for delta in deltas:
            text += delta
            if text and texted is not None:
                texted.add(i)
        return text

    try:
        if i % 2 == 0:
            msgs = [{"role": "user", "content": question}]
            if stream:
                parts = client.chat.completions.create(model=model, messages=msgs, stream=True, extra_body=extra)
                return "stream", joined(c.choices[0].delta.content or "" for c in parts if c.choices)
            r = client.chat.completions.create(model=model, messages=msgs, extra_body=extra)
            return r.model_extra["dllm_trt"].get("replica"), r.choices[0].message.content
        if stream:
            parts = client.completions.create(model=model, prompt=question, stream=True, extra_body=extra)
            return "stream", joined(c.choices[0].text for c in parts if c.choices)
        r = client.completions.create(model=model, prompt=question, extra_body=extra)
        return r.model_extra["dllm_trt"].get("replica"), r.choices[0].text
    except openai.APIStatusError as e:
        return "error", e.status_code, (e.body or {}).get("type")
    except openai.APIError as e:   # an error event inside a stream
        return "error", None, (e.body or {}).get("type")


@contextlib.contextmanager
def ray_server(engines: Path, replicas: int):
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    env = {**os.environ, "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "180", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "serve", "--engines", str(engines), "--ray",
                                 "--replicas", str(replicas), "--port", str(port), "--max-batch", "8"],
                                stdout=err, stderr=err, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    try:
        while True:
            try:   # up once serve --ray says so (every replica running) and the front end answers
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok" and "through Ray Serve" in log.read_text():
                        break
            except (urllib.error.URLError, ConnectionError, ValueError, TimeoutError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve --ray did not start (exit code {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_two_replicas_serve_the_single_process_answers_survive_a_killed_replica_and_drain(arith_engines):
    from fastapi.testclient import TestClient

    from dllm_trt.runtime.api import Engine
    from dllm_trt.runtime.server import create_app

    model = arith_engines.name
    qs = questions(20)
    with TestClient(create_app(Engine.load(arith_engines, threads=1))) as local:
        one = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=local, max_retries=0)
        expected = [ask(one, model, i, q)[1] for i, q in enumerate(qs)]
    assert all(expected[::2]) and len(set(expected)) > 10   # real, distinct answers (chat ones all non-empty)

    with ray_server(arith_engines, replicas=2) as (base, proc, log):
        client = openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=90)
        assert [m.id for m in client.models.list().data] == [model]
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            got = list(pool.map(lambda iq: ask(client, model, *iq), enumerate(qs)))
        assert [text for _, text in got] == expected
        served = collections.Counter(replica for replica, _ in got)
        assert len(served) == 2 and None not in served, served   # both replicas decoded some

        streamed = [ask(client, model, i, qs[i], stream=True) for i in range(4)]
        assert [text for _, text in streamed] == expected[:4]

        unknown = ask(client, "no-such-model", 0, qs[0])
        assert unknown[:2] == ("error", 404)

        # a replica dies with requests in flight, once streams have sent text: each request ends with its answer
        # (one that had sent no text yet is decoded again on the other replica) or with a clean 503 (an error event
        # when streaming); none hangs, none is cut short
        pids = replica_pids(proc.pid)
        assert len(pids) == 2, pids
        texted = Texted()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(ask, client, model, i, qs[i], stream=i % 4 < 2, texted=texted)
                       for i in range(16)]
            texted.wait(3, timeout=60)   # streams on both replicas have likely sent text
            os.kill(pids[0], signal.SIGKILL)
            outcomes = [f.result(timeout=120) for f in futures]
        for i, outcome in enumerate(outcomes):
            if outcome[0] == "error":
                assert outcome[1] in (503, None) and outcome[2] == "server_busy", outcome
            else:
                assert outcome[1] == expected[i], (i, outcome)
        assert sum(o[0] != "error" for o in outcomes) >= 8, outcomes   # the other replica's own requests at least

        deadline = time.monotonic() + 90   # Ray Serve starts a replacement
        while len(replica_pids(proc.pid)) < 2 or pids[0] in replica_pids(proc.pid):
            assert time.monotonic() < deadline, "the killed replica was not replaced"
            time.sleep(0.5)
        after = [ask(client, model, i, qs[i]) for i in range(4)]
        assert [text for _, text in after] == expected[:4]

        # Ctrl-C drains: requests in progress (streams that sent their first text) finish, then the application
        # and Ray stop
        texted = Texted()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, client, model, i, qs[i], stream=True, texted=texted) for i in range(4)]
            texted.wait(1, timeout=60)
            proc.send_signal(signal.SIGINT)
            drained = [f.result(timeout=120) for f in futures]
        assert [text for _, text in drained] == expected[:4], drained
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        assert replica_pids(proc.pid) == []
