"""The HTTP server under load, in several set-ups on the same machine and prompts, in one run.

    python tools/bench_server.py ENGINES --data data/arith_heldout.jsonl [--clients 1,4,16,64] [--requests 128]
        [--max-tokens 128] [--max-batch 32] [--servers one,batched,ray1,ray2]

Servers: `one` = `serve --max-batch 1` (one request at a time), `batched` = `serve --max-batch B` (continuous
batching), `rayN` = `serve --ray --replicas N --max-batch B` (Ray Serve, N replicas; the machine's CPUs are split
between them: --replica-cpus = cores / N, which is also each replica's ONNX Runtime threads). Each is started alone
and warmed up, then for each number of clients C the first --requests chat prompts are sent from C client threads
(each waits for its answer before sending the next) as non-streamed /v1/chat/completions. Tokens are the server's
completion_tokens (generated tokens up to the first end token); latency is per request, from sending to the whole
answer; accuracy is exact match of the final answer. Also reported per server: the mean round trip of GET /v1/models
(no decoding: the HTTP path alone, Ray's proxy and ingress included), and the median time a chat request spends
outside its decoding (40 sent one at a time: wall time minus the engine's dllm_trt.seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dllm_trt.evaluate.load import LoadResult, drive, graded, load_table  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engines: str, max_batch: int, port: int, replicas: int | None = None) -> subprocess.Popen:
    ray = [] if replicas is None else ["--ray", "--replicas", str(replicas),
                                       "--replica-cpus", f"{max(1, (os.cpu_count() or 1) // replicas)}"]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)   # a file: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "serve", "--engines", engines, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "4096", *ray],
                            stdout=log, stderr=log, env={**os.environ, "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "180"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server did not start:\n{Path(log.name).read_text()[-4000:]}")
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not answer /health within 240 s")


def outside_decoding_ms(base: str, model: str, problems: list[dict], max_tokens: int) -> float:
    """Median over requests sent one at a time of wall time minus the decoding time the engine reports: what the
    HTTP path (and Ray Serve's hops) add to each request."""
    extra = []
    for problem in problems:
        start_time = time.perf_counter()
        out = ask(base, model, problem["question"], max_tokens)
        extra.append(time.perf_counter() - start_time - out["dllm_trt"]["seconds"])
    return statistics.median(extra) * 1e3


def round_trip_ms(base: str, n: int = 200) -> float:
    start_time = time.perf_counter()
    for _ in range(n):
        urllib.request.urlopen(base + "/v1/models").read()
    return (time.perf_counter() - start_time) / n * 1e3


def ask(base: str, model: str, question: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def load(base: str, model: str, problems: list[dict], clients: int, mode: str, max_tokens: int) -> LoadResult:
    def ask_one(i):
        out = ask(base, model, problems[i]["question"], max_tokens)
        return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]

    seconds, done = drive(len(problems), clients, ask_one, f"{mode}, {clients} clients")
    return graded(mode, clients, problems, seconds, done)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines")
    p.add_argument("--data", required=True)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--servers", default="one,batched", help="comma-separated: one, batched, ray1, ray2, ...")
    a = p.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    problems = [json.loads(line) for line in Path(a.data).read_text().splitlines()[: a.requests]]
    setups = {"one": ("one at a time", 1, None), "batched": (f"batched (max {a.max_batch})", a.max_batch, None)}
    order = a.servers.split(",")
    results, trips = [], {}
    for name in order:
        replicas = int(name[3:]) if name.startswith("ray") else None
        mode, max_batch, _ = setups.get(name) or (f"Ray Serve, {replicas} replica{'s' * (replicas > 1)} "
                                                  f"(max {a.max_batch} each)", a.max_batch, replicas)
        port = free_port()
        proc = start(a.engines, max_batch, port, replicas)
        base = f"http://127.0.0.1:{port}"
        try:
            model = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
            for _ in range(2 * (replicas or 1)):
                ask(base, model, problems[0]["question"], a.max_tokens)   # warm-up
            trips[mode] = round_trip_ms(base), outside_decoding_ms(base, model, problems[:40], a.max_tokens)
            for c in clients:
                results.append(load(base, model, problems, c, mode, a.max_tokens))
                print(f"{mode}, {c} clients: {results[-1].tokens_per_second:.0f} tok/s", file=sys.stderr)
        finally:
            proc.send_signal(signal.SIGINT)   # serve --ray removes its application and stops its Ray instance
            proc.wait(90)
    modes = list(trips)
    results.sort(key=lambda r: (r.clients, modes.index(r.mode)))
    print(f"HTTP server, {len(problems)} chat prompts from {a.data}, max_tokens {a.max_tokens}\n")
    print(load_table(results, modes[0]))
    print("\nGET /v1/models round trip: " + "; ".join(f"{m}: {ms:.2f} ms" for m, (ms, _) in trips.items()))
    print("per request outside the decoding (one at a time, median of wall - dllm_trt.seconds): "
          + "; ".join(f"{m}: {ms:.1f} ms" for m, (_, ms) in trips.items()))


if __name__ == "__main__":
    main()
