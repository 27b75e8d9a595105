"""Decode bundled problems under every cache policy and schedule; record tokens, steps and refresh counts, so that
two engine formats (or versions) can be compared token for token.

  python tools/equivalence.py record ENGINES --data data/arith_heldout.jsonl --limit 200 --out A.json
  python tools/equivalence.py compare A.json B.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

CONFIGS = {
    "none-blocks": dict(cache="none", block_length=32),
    "prefix-blocks": dict(cache="prefix", block_length=32),
    "dual-blocks": dict(cache="dual", block_length=32),
    "elastic-window": dict(cache="elastic"),
    "elastic-window-keys": dict(cache="elastic", drift_metric="keys", gamma=0.95),
    "elastic-blocks": dict(cache="elastic", block_length=32),
    "elastic-always": dict(cache="elastic", gamma=1.0),
}


def record(a) -> None:
    from dllm_trt.runtime.api import Engine

    engine = Engine.load(a.engines)
    problems = [json.loads(line) for line in open(a.data)][: a.limit]
    out = {"engines": a.engines, "configs": {}}
    for name, options in CONFIGS.items():
        t0 = time.perf_counter()
        rows = []
        for p in problems:
            r = engine.generate(p["question"] if not a.chat else [{"role": "user", "content": p["question"]}],
                                gen_length=a.gen_length, **options)
            rows.append([r.token_ids, r.steps, r.layer_steps_refreshed])
        out["configs"][name] = rows
        print(f"{name}: {len(rows)} problems in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    with open(a.out, "w") as f:
        json.dump(out, f)


def compare(a) -> bool:
    x, y = (json.load(open(p))["configs"] for p in (a.first, a.second))
    same = True
    for name in x:
        rows_x, rows_y = x[name], y.get(name)
        if rows_y is None:
            print(f"{name}: missing in {a.second}")
            same = False
            continue
        tokens = sum(rx[0] != ry[0] for rx, ry in zip(rows_x, rows_y))
        steps = sum(rx[1:] != ry[1:] for rx, ry in zip(rows_x, rows_y))
        print(f"{name}: {len(rows_x)} problems, {tokens} with different tokens, {steps} with different "
              f"steps/refresh counts")
        same &= tokens == 0 and steps == 0
    return same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("engines")
    r.add_argument("--data", default="data/arith_heldout.jsonl")
    r.add_argument("--limit", type=int, default=200)
    r.add_argument("--gen-length", type=int, default=64)
    r.add_argument("--chat", action="store_true")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("first")
    c.add_argument("second")
    a = p.parse_args()
    if a.cmd == "record":
        record(a)
    else:
        sys.exit(0 if compare(a) else 1)


if __name__ == "__main__":
    main()
