"""Time one decoding step's window pass and refresh pass, ONNX Runtime vs torch eager, side by side in one process.

    python tools/bench_pieces.py [--d-model 1024 --layers 8 --heads 16 --prompt 128 --gen 256 --repeats 10]

A random mid-size LLaDA checkpoint is written and exported (fp32) to a temporary folder. A "window pass" is what an
Elastic-Cache step without drift costs (embed the query rows, every range in window mode, head on the window); a
"refresh pass" is a full recompute (every range in refresh mode over the whole canvas). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def step_inputs(cfg, n: int, prompt_len: int, window: int, tracked: int):
    """A canvas with every generation slot still MASK, its window, and a query set of tracked + 1 fresh + window."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(cfg.vocab_size, cfg.mask_token_id), n).astype(np.int64)
    ids[prompt_len:] = cfg.mask_token_id
    targets = np.arange(prompt_len, prompt_len + window)
    queries = np.concatenate([rng.choice(prompt_len - 1, tracked, replace=False), [prompt_len - 1], targets])
    return ids, ids == cfg.mask_token_id, targets, queries, queries[:tracked]


def refresh_step(backend, ids, key_is_mask, targets) -> None:
    """A full recompute: embed every slot, every range in refresh mode, head on the window."""
    backend.embed(ids)
    backend.fetch([backend.refresh(r, targets, key_is_mask) for r in range(len(backend.ranges))])
    backend.head(targets)


def window_step(backend, ids, key_is_mask, targets, queries, track) -> None:
    """An Elastic-Cache step without drift: embed the query rows, every range in window mode, head on the window."""
    backend.embed(ids[queries], queries)
    backend.fetch([backend.window(r, queries, track, targets, key_is_mask) for r in range(len(backend.ranges))])
    backend.head(targets)


def time_passes(backend, n: int, prompt_len: int, window: int, tracked: int, repeats: int) -> dict[str, float]:
    ids, key_is_mask, targets, queries, track = step_inputs(backend.config, n, prompt_len, window, tracked)

    def refresh():
        refresh_step(backend, ids, key_is_mask, targets)

    def window_pass():
        window_step(backend, ids, key_is_mask, targets, queries, track)

    backend.begin(n)
    refresh()  # fill the caches (and warm up)
    window_pass()
    out = {}
    for name, fn in (("refresh", refresh), ("window", window_pass)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    out["queries"] = len(queries)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--tracked", type=int, default=8)
    ap.add_argument("--layers-per-range", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()

    from dllm_trt.export.checkpoint_writer import write_tiny_checkpoint
    from dllm_trt.export.onnx_export import export_model
    from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dllm_trt.runtime.backends.torch_backend import TorchBackend

    n = a.prompt + a.gen
    print(f"model: random LLaDA, d_model {a.d_model}, {a.layers} layers, {a.heads} heads; canvas {n} "
          f"(prompt {a.prompt} + gen {a.gen}); window {a.window}, {a.tracked} tracked + 1 fresh; fp32; "
          f"median of {a.repeats}; {platform.processor() or platform.machine()}\n")
    print("| layers/range | backend | refresh pass (ms) | window pass (ms) | refresh / window |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "m", seed=0, n_layers=a.layers, d_model=a.d_model,
                                      n_heads=a.heads, max_len=max(512, n))
        for k in a.layers_per_range:
            eng = Path(tmp) / f"e{k}"
            export_model(model, eng, layers_per_range=k, max_len=n, max_active=min(64, n), quiet=True)
            for backend in (OnnxRuntimeBackend(eng), TorchBackend(model, layers_per_range=k, device="cpu")):
                r = time_passes(backend, n, a.prompt, a.window, a.tracked, a.repeats)
                print(f"| {k} | {backend.describe()} | {r['refresh'] * 1e3:.1f} | {r['window'] * 1e3:.1f} | "
                      f"{r['refresh'] / r['window']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
