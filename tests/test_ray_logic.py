"""runtime/ray_serve.py without a Ray instance: the front end's RemoteEngine over a stand-in for a deployment handle
that replays a real replica's decoding (ModelReplica.decode over the tiny engine), replicas lost before and after
their first text, back pressure, cancellation; the application's configuration; serve's multi-model app; and the CLI's
refusals of Ray options."""
import asyncio
import dataclasses
import json
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")
from fastapi.testclient import TestClient  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from dllm_trt.cli import main  # noqa: E402
from dllm_trt.runtime import ray_serve  # noqa: E402
from dllm_trt.runtime.api import Engine  # noqa: E402
from dllm_trt.runtime.server import create_app  # noqa: E402
from dllm_trt.runtime.tokenizer import TextTokenizer  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hello there, how are you"}]


@pytest.fixture(scope="module")
def engine(tiny_engines):
    with Engine.load(tiny_engines, threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def replica(engine):
    """A ModelReplica over the session's engine, built without Ray (its constructor asks Ray for its id)."""
    r = ray_serve.ModelReplica.__new__(ray_serve.ModelReplica)
    r.engine, r.replica = engine, "replica-a"
    r.waiters = ThreadPoolExecutor(4)
    yield r
    r.__dict__.pop("engine")   # the module's engine fixture closes it


class Stream:
    """Stands for a DeploymentResponseGenerator: the given items, then `error` if any."""

    def __init__(self, items, error=None):
        self.items, self.error, self.cancelled = items, error, False

    def __iter__(self):
        yield from self.items
        if self.error is not None:
            raise self.error

    def cancel(self):
        self.cancelled = True


class Handle:
    """Stands for a DeploymentHandle of ModelReplica: each call takes the next of `plans`, a function of the replica's
    real event list (decoded now by ModelReplica.decode) that returns a Stream."""

    def __init__(self, replica, plans):
        self.replica, self.plans, self.calls, self.streams = replica, list(plans), 0, []

    def options(self, stream):
        assert stream is True
        return self

    @property
    def decode(self):
        return self

    def remote(self, ids, opts, stream):
        self.calls += 1

        async def events():
            return [item async for item in self.replica.decode(ids, opts, stream)]

        plan = self.plans.pop(0) if self.plans else (lambda items: Stream(items))
        s = plan(asyncio.run(events()))
        self.streams.append(s)
        return s


def remote_app(replica, plans=(), name=None):
    facts = replica.facts()
    handle = Handle(replica, plans)
    return create_app([ray_serve.RemoteEngine(facts, handle, capacity=4)]), handle


def post(client, path, body):
    r = client.post(path, json=body)
    return r.status_code, r.json()


def events(client, body) -> list:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def text_of(chunks) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


def test_the_front_end_answers_and_refuses_as_the_single_process_server(engine, replica):
    app, handle = remote_app(replica)
    bodies = [{"model": engine.name, "messages": MESSAGES, "max_tokens": 24},
              {"model": engine.name, "messages": MESSAGES, "max_tokens": 24, "cache": "dual", "block_length": 8},
              {"model": engine.name, "messages": MESSAGES, "window": 100000},        # wider than the engine takes
              {"model": engine.name, "messages": MESSAGES, "max_tokens": 100000},    # does not fit
              {"model": engine.name, "messages": MESSAGES, "cache": "bogus"},
              {"model": "other", "messages": MESSAGES}]
    with TestClient(create_app(engine)) as local, TestClient(app) as remote:
        for body in bodies:
            (code, want), (got_code, got) = post(local, "/v1/chat/completions", body), \
                post(remote, "/v1/chat/completions", body)
            assert got_code == code, (body, got)
            if code == 200:
                assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
                assert got["dllm_trt"]["replica"] == "replica-a" and "replica" not in want["dllm_trt"]
            else:
                assert got == want
        streamed = events(remote, bodies[0])
        assert text_of(streamed) == post(local, "/v1/chat/completions", bodies[0])[1]["choices"][0]["message"]["content"]
        assert streamed[-1]["choices"][0]["finish_reason"] is not None
    assert handle.calls == 3   # refusals never reach a replica


def test_a_replica_lost_before_its_first_text_is_replaced_after_it_the_request_gets_503(engine, replica):
    body = {"model": engine.name, "messages": MESSAGES, "max_tokens": 24}
    with TestClient(create_app(engine)) as local:
        want = post(local, "/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]
    died = ActorDiedError()

    def lost_before_text(items):   # ticks, then the replica dies
        return Stream([("tick", None)], died)

    def lost_after_text(items):
        first = next(i for i, (kind, _) in enumerate(items) if kind == "text")
        return Stream(items[:first + 1], died)

    app, handle = remote_app(replica, [lost_before_text, lost_before_text])
    with TestClient(app) as client:
        code, reply = post(client, "/v1/chat/completions", body)
        assert (code, reply["choices"][0]["message"]["content"]) == (200, want) and handle.calls == 3

    app, handle = remote_app(replica, [lost_before_text] * 3)   # every try lost: 503
    with TestClient(app) as client:
        code, reply = post(client, "/v1/chat/completions", body)
        assert code == 503 and reply["error"]["type"] == "server_busy" and "replica" in reply["error"]["message"]
        assert handle.calls == 3

    app, handle = remote_app(replica, [lost_after_text])   # text already streamed: an error event, no retry
    with TestClient(app) as client:
        chunks = events(client, body)
        assert chunks[-1]["error"]["type"] == "server_busy" and text_of(chunks[:-1]) and handle.calls == 1
        assert want.startswith(text_of(chunks[:-1]))


def test_back_pressure_is_503_and_a_client_that_leaves_cancels_the_replica_call(engine, replica):
    app, handle = remote_app(replica, [lambda items: Stream([], BackPressureError(num_queued_requests=9,
                                                                                     max_queued_requests=8))])
    with TestClient(app) as client:
        code, reply = post(client, "/v1/chat/completions", {"model": engine.name, "messages": MESSAGES})
    assert code == 503 and reply["error"]["type"] == "server_busy"

    remote = ray_serve.RemoteEngine(replica.facts(), Handle(replica, []), capacity=4)
    prepared = remote.prepare(MESSAGES, max_tokens=24)
    with pytest.raises(ray_serve.Cancelled):
        remote.generate(None, cancelled=lambda: True, prepared=prepared)
    assert remote.handle.streams[0].cancelled


def test_replica_reports_text_then_the_result_and_stops_its_decoding_when_cancelled(engine, replica, monkeypatch):
    remote = ray_serve.RemoteEngine(replica.facts(), None, 1)

    async def collect(ids, opts, stream, stop_after=None):
        out, gen = [], replica.decode(ids, opts, stream)
        async for item in gen:
            out.append(item)
            if stop_after is not None and len(out) == stop_after:
                await gen.aclose()   # what Ray Serve does to a cancelled call
                break
        return out

    items = asyncio.run(collect(*remote.prepare(MESSAGES, max_tokens=24), True))
    kinds = [k for k, _ in items]
    assert kinds[-1] == "result" and set(kinds) <= {"text", "tick", "result"}
    result = items[-1][1]
    assert "".join(v for k, v in items if k == "text") == result.text and result.replica == "replica-a"
    quiet = [k for k, _ in asyncio.run(collect(*remote.prepare(MESSAGES, max_tokens=24), False))]
    assert quiet[-1] == "result" and "text" not in quiet

    monkeypatch.setattr(ray_serve, "TICK_SECONDS", 0.001)   # the first tick comes after a step or two
    ids, opts = remote.prepare(MESSAGES, max_tokens=256, cache="none")
    before = engine.scheduler.steps
    assert asyncio.run(collect(ids, opts, False, stop_after=1))[0][0] == "tick"
    for _ in range(200):   # the abandoned decoding stops at its next step: the scheduler goes idle
        if engine.scheduler.running == 0 and engine.scheduler.queued == 0:
            break
        time.sleep(0.05)
    assert engine.scheduler.running == 0 and engine.scheduler.steps - before < 128   # of 256


def test_facts_and_tokenizer_pickle(replica, tiny_engines):
    facts = pickle.loads(pickle.dumps(replica.facts()))
    tok = TextTokenizer(tiny_engines)
    assert facts.tokenizer.encode_prompt(MESSAGES, chat=True) == tok.encode_prompt(MESSAGES, chat=True)
    assert facts.limits == replica.engine.limits


def test_several_engines_behind_one_app(engine, tiny_engines):
    other = Engine(engine.backend, TextTokenizer(tiny_engines), "second", max_batch=2)
    try:
        with TestClient(create_app([engine, other])) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [engine.name, "second"]
            a = post(client, "/v1/chat/completions", {"model": engine.name, "messages": MESSAGES, "max_tokens": 16})
            b = post(client, "/v1/chat/completions", {"model": "second", "messages": MESSAGES, "max_tokens": 16})
            assert a[0] == b[0] == 200 and a[1]["model"] == engine.name and b[1]["model"] == "second"
            assert a[1]["choices"] == b[1]["choices"]
            code, err = post(client, "/v1/chat/completions", {"model": "third", "messages": MESSAGES})
            assert code == 404 and f"'{engine.name}', 'second'" in err["error"]["message"]
            health = client.get("/health").json()
            assert [m["model"] for m in health["models"]] == [engine.name, "second"] and "running" not in health
    finally:
        other.close()
    with pytest.raises(ValueError, match="distinct names"):
        create_app([engine, engine])


def test_two_models_on_replicas_behind_one_front_end(engine, replica):
    first = replica.facts()
    second = dataclasses.replace(first, name="second")
    app = create_app([ray_serve.RemoteEngine(first, Handle(replica, []), 4),
                      ray_serve.RemoteEngine(second, Handle(replica, []), 4)])
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [first.name, "second"]
        a = post(client, "/v1/chat/completions", {"model": first.name, "messages": MESSAGES, "max_tokens": 16})
        b = post(client, "/v1/chat/completions", {"model": "second", "messages": MESSAGES, "max_tokens": 16})
        assert a[0] == b[0] == 200 and (a[1]["model"], b[1]["model"]) == (first.name, "second")
        code, err = post(client, "/v1/completions", {"model": "third", "prompt": "Hi"})
        assert code == 404 and err["error"]["type"] == "model_not_found"
        assert [m["model"] for m in client.get("/health").json()["models"]] == [first.name, "second"]


def test_application_configuration():
    m = ray_serve.ModelArgs(engines="/x/arith", max_batch=8, autoscale=(1, 4))
    opts = ray_serve.deployment_options(m, 30)
    assert opts["max_ongoing_requests"] == 8 and opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 6 and "num_replicas" not in opts
    assert ray_serve.deployment_options(ray_serve.ModelArgs(engines="/x/a b", replicas=3), 30)["num_replicas"] == 3
    for bad in [dict(autoscale=(3, 1)), dict(autoscale=(0, 0)), dict(replicas=0), dict(max_batch=0),
                dict(unknown=1)]:
        with pytest.raises(ValueError):
            ray_serve.ModelArgs(engines="/x/arith", **bad)
    with pytest.raises(ValueError, match="distinct names"):
        ray_serve.AppArgs(models=[{"engines": "/a/m"}, {"engines": "/b/m"}])
    args = ray_serve.AppArgs(models=[{"engines": "/a/m", "replicas": 2}, {"engines": "/b/n", "autoscale": [1, 3],
                                                                            "num_cpus": 0.5}])
    ray_serve.check_resources(args, {"CPU": 3.5})
    with pytest.raises(ray_serve.NotEnoughResources, match="reserve 3.5 CPUs in all and this Ray instance has 2"):
        ray_serve.check_resources(args, {"CPU": 2})
    with pytest.raises(ray_serve.NotEnoughResources, match="GPU"):
        ray_serve.check_resources(ray_serve.AppArgs(models=[{"engines": "/a/m", "num_gpus": 1}]), {"CPU": 8})


@pytest.fixture
def no_ray(monkeypatch):
    """Refusals come before Ray starts."""
    def fail(*_):
        raise AssertionError("started Ray before refusing")
    monkeypatch.setattr(ray_serve, "serve_on_ray", fail)


@pytest.mark.parametrize("args,message", [
    (["--replicas", "2"], "need --ray"),
    (["--ray-address", "auto"], "need --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1,2"], "exclude each other"),
    (["--ray", "--autoscale", "2"], "MIN,MAX"),
    (["--ray", "--autoscale", "3,1"], "autoscale"),
    (["--ray", "--replicas", "0"], "--replicas: Input should be greater than or equal to 1"),
    (["--ray", "--replica-cpus", "-1"], "--replica-cpus"),
])
def test_serve_refuses_bad_ray_options_in_one_line(tiny_engines, args, message, capsys, no_ray):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--engines", str(tiny_engines), *args])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_two_folders_of_one_name_and_a_missing_folder(tiny_engines, tmp_path, capsys, no_ray):
    with pytest.raises(SystemExit):
        main(["serve", "--engines", str(tiny_engines), str(tiny_engines), "--ray"])
    assert "must differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--engines", str(tmp_path / "nothing"), "--ray"])
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err


def test_doctor_says_whether_ray_is_installed_and_a_cluster_reachable(monkeypatch, tmp_path):
    import socket

    from dllm_trt.runtime import doctor

    assert "pip install 'dllm-trt[ray]'" in doctor.ray_line(None, None)
    assert "no Ray cluster found" in doctor.ray_line("2.60.0", None)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert doctor.reachable(address) is None and doctor.reachable("ray://" + address) is None
    assert doctor.reachable(address) is not None   # closed now
    assert doctor.reachable("nonsense") == "not a host:port address"
    line = doctor.ray_line("2.60.0", address, doctor.reachable(address))
    assert "not reachable" in line and address in line
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert doctor.ray_cluster_address() == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(doctor.tempfile, "gettempdir", lambda: str(tmp_path))
    assert doctor.ray_cluster_address() is None
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.2:6379\n")
    assert doctor.ray_cluster_address() == "10.0.0.2:6379"


def test_health_check_fails_once_the_engine_stops(tiny_engines):
    r = ray_serve.ModelReplica.__new__(ray_serve.ModelReplica)
    r.engine = Engine.load(tiny_engines, threads=1)
    r.check_health()
    r.engine.close()
    with pytest.raises(RuntimeError, match="decoding thread stopped"):
        r.check_health()
