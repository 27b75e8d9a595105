"""Single requests through the Python API, one after another: tokens/s over N chat prompts. Run it from two checkouts
(PYTHONPATH pointing at each) in alternation to compare versions on the same engine folder.

    python tools/bench_single.py ENGINES [N] [--max-tokens 128]
"""
import argparse
import json
import time
from pathlib import Path

from dllm_trt.runtime.api import Engine

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines")
    p.add_argument("n", type=int, nargs="?", default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    a = p.parse_args()
    engine = Engine.load(a.engines)
    lines = (REPO / "data" / "arith_heldout.jsonl").read_text().splitlines()[: a.n]
    prompts = [[{"role": "user", "content": json.loads(line)["question"]}] for line in lines]
    engine.generate(prompts[0], max_tokens=a.max_tokens)   # warm-up
    tokens, began = 0, time.perf_counter()
    for prompt in prompts:
        tokens += engine.generate(prompt, max_tokens=a.max_tokens).tokens
    seconds = time.perf_counter() - began
    print(f"{tokens / seconds:.1f} tok/s ({tokens} tokens, {seconds:.2f} s)")


if __name__ == "__main__":
    main()
