"""Serving under load, in process: C client threads send chat prompts to an Engine's scheduler, each waiting for its
answer before sending the next, as the HTTP server's clients would (without HTTP). Run once with one request at a
time (max_batch 1, the server before continuous batching) and once batched, on the same prompts, in one process.

Throughput counts generated tokens up to the first end token, over the wall time of the whole load; latency is per
request, from sending to its answer (queueing included).
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
from dataclasses import dataclass

from .scoring import is_correct


@dataclass
class LoadResult:
    mode: str
    clients: int
    requests: int
    tokens: int
    seconds: float
    latencies: list[float]
    correct: int | None
    texts: list[str]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def row(self) -> dict:
        return {"mode": self.mode, "clients": self.clients, "requests": self.requests, "tokens": self.tokens,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "p50_seconds": self.percentile(0.5), "p95_seconds": self.percentile(0.95),
                "mean_seconds": statistics.fmean(self.latencies), "correct": self.correct}


def drive(n_requests: int, clients: int, ask, label: str = "", progress: bool = True) -> tuple[float, list]:
    """Requests 0..n-1 sent by `clients` threads, each taking the next unsent one once its previous answer came back;
    ask(i) -> (text, tokens). Returns (wall seconds of the whole load, [(latency, text, tokens)] by request); the
    first error any client met is raised once all clients stopped (the others stop taking new requests)."""
    from tqdm import tqdm

    done: list = [None] * n_requests
    todo, lock, errors = iter(range(n_requests)), threading.Lock(), []
    bar = tqdm(total=n_requests, desc=label, unit="req", disable=not progress, file=sys.stderr)

    def client():
        while not errors:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            sent = time.perf_counter()
            try:
                text, tokens = ask(i)
            except BaseException as e:   # shown by the caller
                errors.append(e)
                return
            done[i] = (time.perf_counter() - sent, text, tokens)
            bar.update()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    bar.close()
    if errors:
        raise errors[0]
    return seconds, done


def graded(mode: str, clients: int, problems: list[dict], seconds: float, done: list) -> LoadResult:
    """A LoadResult from drive()'s answers to `problems` (exact match counted where every problem has an answer)."""
    texts = [text for _, text, _ in done]
    correct = (sum(is_correct(t, p["answer"]) for t, p in zip(texts, problems))
               if all("answer" in p for p in problems) else None)
    return LoadResult(mode, clients, len(problems), sum(tokens for _, _, tokens in done), seconds,
                      [latency for latency, _, _ in done], correct, texts)


def run_load(engine, problems: list[dict], clients: int, mode: str, progress: bool = True,
             **options) -> LoadResult:
    """Every problem's question sent once to `engine` by `clients` threads."""
    prompts = [[{"role": "user", "content": p["question"]}] for p in problems]

    def ask(i):
        res = engine.generate(prompts[i], **options)
        return res.text, res.tokens

    seconds, done = drive(len(prompts), clients, ask, f"{mode}, {clients} clients", progress)
    return graded(mode, clients, problems, seconds, done)


def load_table(results: list[LoadResult], baseline: str = "one at a time") -> str:
    """One row per (mode, clients); ratios against the `baseline` mode at the same number of clients."""
    alone = {r.clients: r for r in results if r.mode == baseline}
    lines = [f"| clients | server | tok/s | vs {baseline} | p50 latency | p95 latency | accuracy | same answers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = alone.get(r.clients)
        ratio = f"{r.tokens_per_second / base.tokens_per_second:.2f}x" if base and base.tokens_per_second else "-"
        same = f"{sum(a == b for a, b in zip(r.texts, base.texts))}/{r.requests}" if base else "-"
        accuracy = "-" if r.correct is None else f"{100 * r.correct / r.requests:.1f}%"
        lines.append(f"| {r.clients} | {r.mode} | {r.tokens_per_second:.0f} | {ratio} | {r.percentile(0.5):.2f} s | "
                     f"{r.percentile(0.95):.2f} s | {accuracy} | {same} |")
    return "\n".join(lines)
