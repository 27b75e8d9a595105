"""Window and refresh step time of two engine formats side by side in one process: a version-1 folder (a window
and a refresh graph per layer range) against a version-2 folder (one graph per range serving both modes), both
exported from the same checkpoint.

    python tools/bench_contract.py --v1 OLD_ENGINES --v2 NEW_ENGINES [--canvas 384] [--repeats 10] [--batch 8]

Only onnxruntime and numpy are used (no dllm_trt import), so that folders of both formats load in one process.
Every range's graph runs on random inputs of a step's shapes: window step = `--rows` query rows (8 tracked + 1
fresh + 16 window by default) through every range; refresh step = every slot of the canvas through every range.
Sessions get the options the ONNX Runtime backend gives an fp32 engine (all physical cores, sequential, no
pre-packing: the weights are memory-mapped and shared). The two formats alternate inside each repeat; medians of
wall-clock and process CPU time. With --batch B, also the format-2 window step of B sequences in one call against
B calls of one sequence (same shapes per sequence, no padding).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

TRACKED, FRESH, WINDOW = 8, 1, 16


def session(path: Path, threads: int, prepack: bool):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(graph, sizes: dict[str, int], rng: np.random.Generator, batched: bool, refresh: bool) -> dict:
    """Inputs for one call: sizes by dim name; positions, rows and masks valid for the mode."""
    n, rows = sizes["seq_len"], sizes["rows"]
    out = {}
    for i in graph.get_inputs():
        shape = [1 if d == "batch" else sizes.get(d, d) if isinstance(d, str) else d for d in i.shape]
        name = i.name
        if name == "position_ids":
            value = np.arange(n) if refresh else np.sort(rng.choice(n, rows, replace=False))
        elif name in ("track_rows",):
            value = np.zeros(1) if refresh else np.arange(TRACKED)
        elif name in ("window_rows", "window_positions"):
            value = (np.arange(n - WINDOW, n) if refresh or name == "window_positions"
                     else np.arange(rows - WINDOW, rows))
        elif name == "canvas_lengths":
            value = np.array([n])
        elif name == "key_is_mask":
            value = np.arange(n) >= n // 2
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        if name in ("position_ids", "track_rows", "window_rows", "window_positions", "canvas_lengths"):
            value = value.astype(np.int64)
        if batched and name not in ("canvas_lengths",) and value.ndim < len(shape):
            value = value[None]
        out[name] = value
    return out


class Format:
    """The layer-range graphs of one engine folder, per mode, with inputs prepared once."""

    def __init__(self, folder: Path, canvas: int, rows: int, threads: int, prepack: bool, seed: int):
        manifest = json.loads((folder / "manifest.json").read_text())
        self.version = manifest["format_version"]
        self.weight_bytes = sum({p["data_file"]: p["data_size"] for p in manifest["pieces"] if p.get("data_file")}.values())
        rng = np.random.default_rng(seed)
        self.calls = {"window": [], "refresh": []}
        for a, b in manifest["layer_ranges"]:
            name = f"layers_{a:02d}_{b:02d}"
            for mode in ("window", "refresh"):
                file = folder / (f"{name}.{mode}.onnx" if self.version == 1 else f"{name}.onnx")
                s = session(file, threads, prepack)
                sizes = {"seq_len": canvas, "rows": canvas if mode == "refresh" else rows,
                         "active_len": rows, "track_len": 1 if (mode == "refresh" and self.version == 2) else TRACKED,
                         "window_len": WINDOW}
                self.calls[mode].append((s, feeds(s, sizes, rng, self.version == 2, mode == "refresh")))

    def step(self, mode: str, batch: int = 1) -> tuple[float, float]:
        calls = [(s, f if batch == 1 else {k: np.concatenate([v] * batch) for k, v in f.items()})
                 for s, f in self.calls[mode]]
        wall, cpu = time.perf_counter(), time.process_time()
        for s, f in calls:
            s.run(None, f)
        return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v1", type=Path, required=True)
    p.add_argument("--v2", type=Path, required=True)
    p.add_argument("--canvas", type=int, default=384)
    p.add_argument("--rows", type=int, default=TRACKED + FRESH + WINDOW)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--prepack", action="store_true", help="pre-pack weights (what quantized engines do)")
    p.add_argument("--batch", type=int, default=1, help="also time a format-2 window step of this many sequences")
    a = p.parse_args()
    formats = {v: Format(folder, a.canvas, a.rows, a.threads, a.prepack, seed=0)
               for v, folder in (("v1", a.v1), ("v2", a.v2))}
    times = {(v, mode): [] for v in formats for mode in ("window", "refresh")}
    for _ in range(2):   # warm-up: arenas grown, pages in
        for v, f in formats.items():
            f.step("window"), f.step("refresh")
    for _ in range(a.repeats):
        for mode in ("window", "refresh"):
            for v, f in formats.items():
                times[(v, mode)].append(f.step(mode))
    print(f"canvas {a.canvas}, window step {a.rows} rows, {a.threads} threads, {a.repeats} repeats (medians)")
    print("| step | v1 wall ms | v2 wall ms | v2/v1 wall | v1 CPU ms | v2 CPU ms | v2/v1 CPU |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("window", "refresh"):
        w1, c1 = (statistics.median(t[i] for t in times[("v1", mode)]) * 1e3 for i in (0, 1))
        w2, c2 = (statistics.median(t[i] for t in times[("v2", mode)]) * 1e3 for i in (0, 1))
        print(f"| {mode} | {w1:.1f} | {w2:.1f} | {w2 / w1:.3f} | {c1:.1f} | {c2:.1f} | {c2 / c1:.3f} |")
    if a.batch > 1:
        v2 = formats["v2"]
        together, alone = [], []
        for _ in range(a.repeats):
            together.append(v2.step("window", a.batch))
            alone.append(tuple(sum(t) for t in zip(*(v2.step("window") for _ in range(a.batch)))))
        w_t, c_t = (statistics.median(t[i] for t in together) * 1e3 for i in (0, 1))
        w_a, c_a = (statistics.median(t[i] for t in alone) * 1e3 for i in (0, 1))
        print(f"format 2 window step, {a.batch} sequences in one call: {w_t:.1f} ms wall / {c_t:.1f} ms CPU; "
              f"{a.batch} calls of one: {w_a:.1f} / {c_a:.1f} ms; ratio {w_t / w_a:.3f} wall, {c_t / c_a:.3f} CPU")


if __name__ == "__main__":
    main()
