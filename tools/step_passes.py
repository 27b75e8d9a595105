"""The two step shapes the benchmarks time on an ONNX Runtime backend (shared by bench_memory and bench_quant):
a refresh pass (the whole canvas through every range, then the head on 16 rows) and a window pass (25 query rows:
8 tracked + 1 fresh + 16 window, every range, then the head on the 16 window rows), as in BENCHMARKS section 5."""
from __future__ import annotations

import resource

import numpy as np


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def refresh_pass(b, n: int) -> None:
    key_is_mask = np.arange(n) >= n // 2
    window = np.arange(n // 2, n // 2 + 16)
    b.embed(np.arange(n) % b.config.vocab_size)
    for r in range(len(b.ranges)):
        b.refresh(r, window, key_is_mask)
    b.head(window)


def window_pass(b, n: int) -> None:
    key_is_mask = np.arange(n) >= n // 2
    rows = np.arange(n // 2 - 9, n // 2 + 16)
    b.embed(rows % b.config.vocab_size, rows)
    for r in range(len(b.ranges)):
        b.window(r, rows, rows[:8], rows[9:], key_is_mask)
    b.head(rows[9:])


def side_by_side(backends: dict, n: int, repeats: int) -> dict:
    """Median wall and process CPU seconds of a window and a refresh pass for each backend, alternating between
    them inside each repeat (so that a busy machine disturbs all of them alike), after one untimed pass each."""
    import time

    for b in backends.values():
        b.begin(n)
        refresh_pass(b, n)
        window_pass(b, n)
    times = {k: {"window": [], "refresh": [], "window_cpu": [], "refresh_cpu": []} for k in backends}
    for _ in range(repeats):
        for k, b in backends.items():
            for kind, fn in (("window", window_pass), ("refresh", refresh_pass)):
                c, t = cpu_seconds(), time.perf_counter()
                fn(b, n)
                times[k][kind].append(time.perf_counter() - t)
                times[k][kind + "_cpu"].append(cpu_seconds() - c)
    return {k: {kind: float(np.median(v)) for kind, v in d.items()} for k, d in times.items()}
