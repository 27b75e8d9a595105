"""The window step of B sequences in one batched call per piece against B steps of one sequence, through the ONNX
Runtime backend (its padding, stacked caches and copies back included), side by side in one process.

    python tools/bench_batch.py ENGINES [--batch 8] [--canvas 384] [--repeats 5] [--threads N]

Each sequence gets a canvas of --canvas slots, filled by a full refresh; a window step is the embedding, every
layer range in window mode and the head, on 25 query rows (8 tracked + 1 fresh + 16 window, as
tools/bench_contract.py) at different slots per sequence. The two ways alternate inside each repeat; medians of
wall-clock and process CPU time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

TRACKED, FRESH, WINDOW = 8, 1, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--canvas", type=int, default=384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    backend = OnnxRuntimeBackend(a.engines, threads=a.threads)
    cfg, n, rng = backend.config, a.canvas, np.random.default_rng(0)
    seqs, steps = [], []
    for _ in range(a.batch):
        seq = backend.open(n)
        ids = rng.integers(2, cfg.vocab_size, n)
        key_is_mask = rng.random(n) < 0.5
        backend.use(seq)
        backend.embed(ids)
        for r in range(len(backend.ranges)):
            backend.refresh(r, np.arange(n - WINDOW, n), key_is_mask)
        rows = np.sort(rng.choice(n, TRACKED + FRESH + WINDOW, replace=False))
        seqs.append(seq)
        steps.append((ids[rows], rows, rows[:TRACKED], rows[-WINDOW:], key_is_mask))

    def one_by_one():
        for seq, (ids, rows, tracked, targets, key_is_mask) in zip(seqs, steps):
            backend.embed_many([seq], [ids], [rows])
            for r in range(len(backend.ranges)):
                backend.window_many(r, [seq], [rows], [tracked], [targets], [key_is_mask])
            backend.head_many([seq], [targets])

    def together():
        ids, rows, tracked, targets, key_is_mask = (list(x) for x in zip(*steps))
        backend.embed_many(seqs, ids, rows)
        for r in range(len(backend.ranges)):
            backend.window_many(r, seqs, rows, tracked, targets, key_is_mask)
        backend.head_many(seqs, targets)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    for _ in range(2):   # warm-up: arenas grown, pages in
        one_by_one(), together()
    alone, batched = [], []
    for _ in range(a.repeats):
        alone.append(timed(one_by_one))
        batched.append(timed(together))
    w_a, c_a = (statistics.median(t[i] for t in alone) * 1e3 for i in (0, 1))
    w_b, c_b = (statistics.median(t[i] for t in batched) * 1e3 for i in (0, 1))
    print(f"{backend.describe()}, {backend.threads} threads, canvas {n}, {TRACKED + FRESH + WINDOW} query rows, "
          f"{a.repeats} repeats (medians)")
    print(f"{a.batch} window steps of one sequence: {w_a:.1f} ms wall / {c_a:.1f} ms CPU")
    print(f"one window step of {a.batch} sequences: {w_b:.1f} ms wall / {c_b:.1f} ms CPU")
    print(f"ratio: {w_b / w_a:.3f} wall, {c_b / c_a:.3f} CPU")


if __name__ == "__main__":
    main()
