"""The HTTP server under load: one request at a time (`serve --max-batch 1`) against continuous batching, on the same
machine and prompts, in one run.

    python tools/bench_server.py ENGINES --data data/arith_heldout.jsonl [--clients 1,4,16,64] [--requests 128]
        [--max-tokens 128] [--max-batch 32]

Starts `dllm-trt serve` twice (one server at a time, each warmed up), then for each number of clients C sends the
first --requests chat prompts from C client threads (each waits for its answer before sending the next) as
non-streamed /v1/chat/completions. Tokens are the server's completion_tokens (generated tokens up to the first end
token); latency is per request, from sending to the whole answer; accuracy is exact match of the final answer.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dllm_trt.evaluate.load import LoadResult, drive, graded, load_table  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engines: str, max_batch: int, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "serve", "--engines", engines, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server did not start:\n{proc.stderr.read()}")
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not answer /health within 120 s")


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
    a = p.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    problems = [json.loads(line) for line in Path(a.data).read_text().splitlines()[: a.requests]]
    results = []
    for mode, max_batch in (("one at a time", 1), (f"batched (max {a.max_batch})", a.max_batch)):
        port = free_port()
        proc = start(a.engines, max_batch, port)
        base = f"http://127.0.0.1:{port}"
        try:
            model = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
            ask(base, model, problems[0]["question"], a.max_tokens)   # warm-up
            for c in clients:
                results.append(load(base, model, problems, c, mode, a.max_tokens))
                print(f"{mode}, {c} clients: {results[-1].tokens_per_second:.0f} tok/s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
    results.sort(key=lambda r: (r.clients, r.mode != "one at a time"))
    print(f"HTTP server, {len(problems)} chat prompts from {a.data}, max_tokens {a.max_tokens}\n")
    print(load_table(results))


if __name__ == "__main__":
    main()
