"""Range-by-range vs batched step order on CPU, side by side in one process (same prompts, alternating); with
--compare caches, ONNX Runtime's numpy caches vs its device caches (OrtValues written by helper graphs, the CUDA
provider's layout) on the CPU provider, both range by range.

    python tools/bench_step_order.py --engines engines/arith-<key> [--prompts 40 --repeats 3] [--compare caches]

Both orders, and both cache places, decode identical tokens (tests/test_step_order.py,
tests/test_ort_device_caches.py); this measures what each costs on ONNX Runtime.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from dllm_trt.evaluate.harness import load_problems
from dllm_trt.runtime.api import Engine
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DecodeOptions, build

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", required=True)
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gammas", default="0.9,0.93,0.95")
    p.add_argument("--compare", choices=("order", "caches"), default="order")
    a = p.parse_args()
    engine = Engine.load(a.engines, "onnxruntime")
    if a.compare == "order":
        variants = {"range-by-range": (engine.backend, "range"), "batched": (engine.backend, "batched")}
    else:
        variants = {"host caches": (OnnxRuntimeBackend(a.engines, caches="host"), "range"),
                    "device caches": (OnnxRuntimeBackend(a.engines, caches="device"), "range")}
    first, second = variants
    prompts = [engine.encode([{"role": "user", "content": q["question"]}])
               for q in load_problems(str(REPO / "data" / "arith_heldout.jsonl"), a.prompts)]
    print(f"| gamma | refresh fraction | {first} tok/s | {second} tok/s | {second} / {first} |")
    print("|---|---|---|---|---|")
    for gamma in (float(g) for g in a.gammas.split(",")):
        speed = {name: [] for name in variants}
        for _ in range(a.repeats):
            for name, (backend, order) in variants.items():
                tokens = seconds = refreshed = total = 0
                for ids in prompts:
                    schedule, policy = build(DecodeOptions(cache="elastic", gamma=gamma), 128)
                    res = Decoder(backend, policy, schedule, step_order=order).generate(ids)
                    tokens, seconds = tokens + res.tokens, seconds + res.seconds
                    refreshed, total = refreshed + res.layer_steps_refreshed, total + res.layer_steps_total
                speed[name].append(tokens / seconds)
        r, b = statistics.median(speed[first]), statistics.median(speed[second])
        print(f"| {gamma} | {refreshed / total:.3f} | {r:.1f} | {b:.1f} | {b / r:.2f}x |")


if __name__ == "__main__":
    main()
