"""The OpenAI server on Ray Serve: replicas of exported engines across processes and machines.

One Ray Serve application, two kinds of deployment:
- `ModelReplica`, one deployment per engine folder: each replica loads the folder once (memory-mapped weights, so
  replicas on one host share their pages), warms up before it reports ready, and decodes up to its max_batch
  requests together through its Engine's scheduler. Ray Serve sends it at most that many (max_ongoing_requests),
  restarts it when it dies or its health check fails, and adds or removes replicas when autoscaling.
- `Frontend`, the ingress: runtime/server.py's app itself (the same routes, limits, errors and streaming), serving
  one RemoteEngine per model. A RemoteEngine parses, validates and tokenizes a request where it arrives, with the
  tokenizer and limits of its engine, then streams the decoding from a replica; a request whose replica dies
  before it sent any text is decoded again on another one, after that it ends with a 503.

Entry points: `dllm-trt serve --ray` (cli.py, through `serve_on_ray`) and `build_app`, the application builder that
`serve run` and `serve deploy` configs import (docs/SCALING.md).
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from .api import DEFAULT_MAX_BATCH, Cancelled, Engine, QueueFull, RequestLimits, check_request, encode_prompt
from .manifest import MAX_BATCH_LIMIT
from .server import DEFAULT_ADMIT_SECONDS, DEFAULT_MAX_BODY, MAX_QUEUE, Decoding, Unavailable, create_app
from .tokenizer import TextTokenizer

APP_NAME = "dllm-trt"
TICK_SECONDS = 0.5              # a replica reports at least this often, so that the front end sees a client leave
RETRIES = 2                     # decodings started again after their replica died, while no text was sent
LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)   # the replica (or all) is gone
SERVE_LOGS = "/tmp/ray/session_latest/logs/serve"   # Ray's default log folder of each node
log = logging.getLogger("dllm_trt.server")


def log_to_serve() -> None:
    """The server's log lines (rejected requests, lost replicas, tracebacks of faults) into this replica's Ray Serve
    log, beside Ray Serve's own."""
    serve_log = logging.getLogger("ray.serve")
    log.handlers, log.propagate = list(serve_log.handlers), False
    log.setLevel(logging.INFO)


@dataclass
class EngineFacts:
    """What the front end needs of a replica's engine to take requests for it."""
    name: str
    tokenizer: TextTokenizer
    limits: RequestLimits
    max_batch: int
    backend: str
    weight_bytes: int | None


class ModelReplica:
    """One replica of one engine folder (deployed by build_app, one deployment per folder)."""

    def __init__(self, engines: str, backend: str = "auto", threads: int | None = None,
                 max_batch: int | None = None):
        log_to_serve()
        self.engine = Engine.load(engines, backend, threads, max_batch=max_batch)
        self.engine.warmup()   # before the replica counts as ready: its first request must not pay for it
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        # each request in progress (at most max_batch: max_ongoing_requests) waits for the scheduler in a thread of its
        # own, as in the single-process server
        self.waiters = ThreadPoolExecutor(max_workers=max_batch or DEFAULT_MAX_BATCH, thread_name_prefix="decode")

    def facts(self) -> EngineFacts:
        e = self.engine
        return EngineFacts(e.name, e.tokenizer, e.limits, e.max_batch, e.backend.describe(),
                           e.weight_bytes)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self.engine.scheduler.alive:
            raise RuntimeError(f"{self.engine.name}: the decoding thread stopped")

    async def decode(self, prompt_ids: list[int], opts, stream: bool):
        """Yields ("text", delta) while decoding when `stream`, ("tick", None) at least every TICK_SECONDS, then
        ("result", GenerationResult); raises what the decoding raised. Cancelling the call (the client left) stops
        the decoding at its next step."""
        loop = asyncio.get_running_loop()
        # the single-process server's decoding in a worker thread: text as it becomes final, then the result or
        # the exception it ended with
        decoding = Decoding(self.engine, None, self.engine.plan(prompt_ids, opts), stream, loop)
        loop.run_in_executor(self.waiters, decoding.run)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(decoding.events.get(), TICK_SECONDS)
                except asyncio.TimeoutError:
                    yield "tick", None
                    continue
                if isinstance(item, str):
                    yield "text", item
                    continue
                if isinstance(item, BaseException):
                    raise item
                item.replica = self.replica
                yield "result", item
                return
        finally:
            decoding.stop.set()   # cancelled or done: a decoding still running stops at its next step

    def __del__(self):
        # Ray Serve waits for the requests in progress (graceful_shutdown_timeout_s) before it drops a replica
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.close()


class RemoteEngine:
    """An Engine to runtime/server.py whose decoding runs on the replicas of one ModelReplica deployment."""

    def __init__(self, facts: EngineFacts, handle, capacity: int):
        """capacity: requests the replicas decode together at most (max_batch times the most replicas)."""
        self.facts, self.handle = facts, handle
        self.name, self.tokenizer, self.max_positions = facts.name, facts.tokenizer, facts.limits.max_positions
        self.max_batch = capacity

    def status(self) -> dict:
        f = self.facts
        return {"backend": f"Ray Serve replicas of {f.backend}", "max_batch": self.max_batch,
                "replica_max_batch": f.max_batch, "weight_bytes": f.weight_bytes}

    def prepare(self, prompt, **options):
        """Engine.prepare's checks and errors, with the engine's own limits: (prompt ids, options)."""
        ids, opts, _, _ = check_request(self.encode, self.facts.limits, prompt, options)
        return ids, opts

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def generate(self, prompt, on_text=None, cancelled=None, prepared=None, **options):
        """Engine.generate, decoded by a replica (blocks the calling thread, as Engine.generate does). A replica
        that dies before this request's first text is replaced by another (Ray Serve routes to the live ones);
        after that, Unavailable (503): the client has text that a new decoding would send again."""
        ids, opts = prepared or self.prepare(prompt, **options)
        for attempt in range(RETRIES + 1):
            sent: list[str] = []
            try:
                return self._decode(ids, opts, on_text, cancelled, sent)
            except BackPressureError:
                raise QueueFull("the replicas' queue is full") from None
            except LOST as e:
                if sent or attempt == RETRIES:
                    raise Unavailable(f"the replica decoding this request stopped ({type(e).__name__})") from e
                log.warning("%s: a replica stopped before its first text; decoding again (%s)", self.name,
                            type(e).__name__)

    def _decode(self, ids, opts, on_text, cancelled, sent: list):
        response = self.handle.options(stream=True).decode.remote(ids, opts, on_text is not None)
        for kind, value in response:
            if cancelled is not None and cancelled():
                response.cancel()
                raise Cancelled()
            if kind == "text":
                sent.append(value)
                on_text(value)
            elif kind == "result":
                return value
        raise Unavailable("the replica's stream ended without a result")


@serve.ingress()
class Frontend:
    """The ingress: runtime/server.py's app over one RemoteEngine per ModelReplica deployment."""

    async def __init__(self, replicas: list, capacities: list[int], max_queue: int, max_body: int,
                       admit_timeout: float):
        log_to_serve()
        facts = await asyncio.gather(*(handle.facts.remote() for handle in replicas))
        self.engines = [RemoteEngine(f, h, c) for f, h, c in zip(facts, replicas, capacities)]
        self.limits = (max_queue, max_body, admit_timeout)

    def __serve_build_asgi_app__(self):
        return create_app(self.engines, *self.limits)


# ---- configuration -------------------------------------------------------------------------------------------------
class ModelArgs(BaseModel):
    """One engine folder's deployment (a `models` entry of build_app's arguments)."""
    model_config = ConfigDict(extra="forbid")
    engines: str                                     # the folder, at this path on every node that runs a replica
    backend: str = "auto"
    threads: int | None = Field(None, ge=1)          # per replica; None: its num_cpus (at least 1)
    max_batch: int = Field(DEFAULT_MAX_BATCH, ge=1, le=MAX_BATCH_LIMIT)   # requests one replica decodes together
    replicas: int = Field(1, ge=1)
    autoscale: tuple[int, int] | None = None         # (min, max) replicas; replaces `replicas`
    num_cpus: float = Field(1.0, ge=0)               # Ray resources one replica reserves
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"autoscale must be MIN,MAX with 0 <= MIN <= MAX and MAX >= 1, got {low},{high}")
        return self

    @property
    def name(self) -> str:
        return Path(self.engines).name   # the model name, as Engine.load gives it

    @property
    def most_replicas(self) -> int:
        return self.replicas if self.autoscale is None else self.autoscale[1]


class AppArgs(BaseModel):
    """build_app's arguments: the `args` of a Serve config's application."""
    model_config = ConfigDict(extra="forbid")
    models: list[ModelArgs] = Field(min_length=1)
    max_queue: int = Field(16, ge=0, le=MAX_QUEUE)   # per model: requests waiting beyond those decoding
    max_body: int = Field(DEFAULT_MAX_BODY, ge=1)
    admit_timeout: float = Field(DEFAULT_ADMIT_SECONDS, gt=0)
    graceful_shutdown_s: float = Field(300, ge=0)    # how long a stopping replica may finish its requests

    @model_validator(mode="after")
    def _distinct(self):
        names = [m.name for m in self.models]
        if len(set(names)) < len(names):
            raise ValueError(f"engine folders must have distinct names (the model names), got {names}")
        return self


def deployment_options(m: ModelArgs, graceful_shutdown_s: float) -> dict:
    scale = ({"num_replicas": m.replicas} if m.autoscale is None else
             # scale up when replicas run, on average, more than ~70% of the requests they can decode together
             {"autoscaling_config": {"min_replicas": m.autoscale[0], "max_replicas": m.autoscale[1],
                                     "target_ongoing_requests": max(1, math.ceil(0.7 * m.max_batch))}})
    return {"name": "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", m.name), **scale,
            "max_ongoing_requests": m.max_batch, "graceful_shutdown_timeout_s": graceful_shutdown_s,
            "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus}}


def build_app(args: dict | AppArgs):
    """The application: one ModelReplica deployment per `models` entry behind the Frontend. For `serve run
    dllm_trt.runtime.ray_serve:build_app` and the import_path of a `serve deploy` config."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    replicas, capacities = [], []
    for m in a.models:
        threads = m.threads or max(1, int(m.num_cpus))   # as many ONNX Runtime threads as cores reserved
        deployment = serve.deployment(ModelReplica).options(**deployment_options(m, a.graceful_shutdown_s))
        replicas.append(deployment.bind(str(Path(m.engines).resolve()), m.backend, threads, m.max_batch))
        capacities.append(m.max_batch * m.most_replicas)
    front = serve.deployment(Frontend).options(
        name="frontend", num_replicas=1, ray_actor_options={"num_cpus": 0},
        # the front end bounds its requests itself (503 past each model's capacity + max_queue); /health and
        # /v1/models must answer beside them
        max_ongoing_requests=sum(capacities) + a.max_queue * len(capacities) + 64,
        graceful_shutdown_timeout_s=a.graceful_shutdown_s)
    return front.bind(replicas, capacities, a.max_queue, a.max_body, a.admit_timeout)


class NotEnoughResources(Exception):
    """The replicas asked for need more CPUs or GPUs than a local Ray instance has."""


class DeployFailed(Exception):
    """The application did not start (a replica failed to load its engine folder, say)."""


def check_resources(app_args: AppArgs, have: dict) -> None:
    """NotEnoughResources when every model's (most) replicas cannot be placed on `have` (ray.cluster_resources()):
    Ray Serve would otherwise wait for them forever."""
    for kind, per_replica in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(getattr(m, per_replica) * m.most_replicas for m in app_args.models)
        if need > have.get(kind, 0) + 1e-9:
            flag = "--replica-cpus" if kind == "CPU" else "--replica-gpus"
            raise NotEnoughResources(f"the replicas reserve {need:g} {kind}s in all and this Ray instance has "
                                     f"{have.get(kind, 0):g}: fewer replicas, or a smaller {flag} (replicas may "
                                     f"share a CPU: 0.5 each), or a cluster (--ray-address)")


def serve_on_ray(app_args: AppArgs, host: str, port: int, address: str | None) -> None:
    """`dllm-trt serve --ray`: join a Ray cluster (address, 'auto': the one `ray start` runs on this node) or start
    a Ray instance for this server alone (None), run the application with its HTTP proxy on host:port, and keep it
    up until Ctrl-C or SIGTERM; then drain the requests in progress and remove it."""
    import signal

    import ray

    stopping, serving = threading.Event(), threading.Event()

    def stop(*_):   # SIGINT or SIGTERM; SIGINT too where it came ignored (a background job of a script)
        if serving.is_set() and not stopping.is_set():
            stopping.set()   # the loop below ends, then the application drains
        else:
            raise KeyboardInterrupt   # while starting, or a second signal while draining

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    where = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
    print(f"starting on {where}: replicas load and warm up before serving (tens of seconds)", file=sys.stderr, flush=True)
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            check_resources(app_args, ray.cluster_resources())
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)   # this process's part: our own lines say it
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Ray's report ends with what failed (a port in use, a replica's own error, ...)
            last = [line for line in str(e).splitlines() if line.strip()][-1].strip()
            raise DeployFailed(f"Ray Serve could not start: {last} (its logs: {SERVE_LOGS} on each node)") from None
        for m in app_args.models:
            count = f"{m.replicas}" if m.autoscale is None else f"{m.autoscale[0]}..{m.autoscale[1]}"
            print(f"serving {m.name}: {count} replica(s), each decoding up to {m.max_batch} requests together on "
                  f"{m.num_cpus:g} CPU(s){f' and {m.num_gpus:g} GPU(s)' if m.num_gpus else ''}", file=sys.stderr, flush=True)
        print(f"on http://{host}:{port}/v1 through Ray Serve (Ctrl-C drains requests in progress, then stops)",
              file=sys.stderr, flush=True)
        serving.set()
        while not stopping.is_set():
            time.sleep(0.5)
        print("draining requests in progress, then stopping", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if ray.is_initialized() and serve.status().applications.get(APP_NAME) is not None:
                serve.delete(APP_NAME)   # waits while replicas finish their requests (graceful_shutdown_s)
        finally:
            ray.shutdown()
