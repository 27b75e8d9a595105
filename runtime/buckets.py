"""Static shape buckets: the one place that decides which fixed shapes a window step runs at.

A window step's row counts (query rows, tracked rows, window rows) change from step to step. Padding each up to
the next bucket size with inert rows makes every step one of a few fixed-shape computations, which a CUDA graph
(or a TensorRT profile) can be made for once. Inert rows change nothing (see LayerRange.window's validity masks):
pad query rows sit in a scratch cache slot that real rows never attend to, pad tracked/window rows point at row 0
and are left out of the drift means and column sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMALLEST = 8


def bucket_sizes(limit: int, smallest: int = SMALLEST) -> list[int]:
    """Powers of two from `smallest` up to the first one >= limit, the last one capped at limit:
    bucket_sizes(40) == [8, 16, 32, 40]."""
    if limit < 1:
        raise ValueError(f"bucket limit must be positive, got {limit}")
    sizes, s = [], smallest
    while s < limit:
        sizes.append(s)
        s *= 2
    return sizes + [limit]


def bucket_for(count: int, sizes: list[int]) -> int:
    """The smallest bucket that holds `count` rows."""
    for s in sizes:
        if count <= s:
            return s
    raise ValueError(f"{count} rows exceed the largest bucket {sizes[-1]}")


@dataclass(frozen=True)
class StepShape:
    """The padded row counts of one window step; with the canvas length, the key of its fixed-shape computation."""
    canvas: int
    queries: int
    tracked: int
    window: int


def step_shape(canvas: int, n_queries: int, n_tracked: int, n_window: int, sizes: list[int]) -> StepShape:
    return StepShape(canvas, bucket_for(n_queries, sizes), bucket_for(max(n_tracked, 1), sizes),
                     bucket_for(max(n_window, 1), sizes))


def pad(values: np.ndarray, size: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """(values padded with `fill` to `size`, validity mask)."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) > size:
        raise ValueError(f"{len(values)} rows do not fit a bucket of {size}")
    out = np.full(size, fill, dtype=np.int64)
    out[: len(values)] = values
    return out, np.arange(size) < len(values)


def manifest_entry(max_len: int, max_active: int, smallest: int = SMALLEST) -> dict:
    """What an exported engine records about its static shapes (for the exporter to put into manifest.json under
    "buckets"): the canvas limit, the row buckets a window step is padded to, and the one extra scratch cache slot
    that padded steps need."""
    return {"canvas": int(max_len), "rows": bucket_sizes(max_active, smallest), "scratch_slots": 1}
