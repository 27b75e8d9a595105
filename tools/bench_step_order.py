"""Range-by-range vs batched step order on CPU, side by side in one process (same prompts, alternating).

    python tools/bench_step_order.py --engines engines/arith-<key> [--prompts 40 --repeats 3]

Both orders decode identical tokens (tests/test_step_order.py); this measures what each costs on ONNX Runtime.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from dllm_trt.evaluate.harness import load_problems
from dllm_trt.runtime.api import Engine
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DecodeOptions, build

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", required=True)
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gammas", default="0.9,0.93,0.95")
    a = p.parse_args()
    engine = Engine.load(a.engines, "onnxruntime")
    prompts = [engine.encode([{"role": "user", "content": q["question"]}])
               for q in load_problems(str(REPO / "data" / "arith_heldout.jsonl"), a.prompts)]
    print("| gamma | refresh fraction | range-by-range tok/s | batched tok/s | batched / range |")
    print("|---|---|---|---|---|")
    for gamma in (float(g) for g in a.gammas.split(",")):
        speed = {"range": [], "batched": []}
        for _ in range(a.repeats):
            for order in speed:
                tokens = seconds = refreshed = total = 0
                for ids in prompts:
                    schedule, policy = build(DecodeOptions(cache="elastic", gamma=gamma), 128)
                    res = Decoder(engine.backend, policy, schedule, step_order=order).generate(ids)
                    tokens, seconds = tokens + res.tokens, seconds + res.seconds
                    refreshed, total = refreshed + res.layer_steps_refreshed, total + res.layer_steps_total
                speed[order].append(tokens / seconds)
        r, b = statistics.median(speed["range"]), statistics.median(speed["batched"])
        print(f"| {gamma} | {refreshed / total:.3f} | {r:.1f} | {b:.1f} | {b / r:.2f}x |")


if __name__ == "__main__":
    main()
