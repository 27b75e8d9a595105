"""`dllm-trt calibrate`: the drift threshold gamma with the fewest refreshes that still meets a target, measured
per drift metric on the user's prompts.

The search (search) is explicit and cheap: a coarse grid of gammas, then bisection of the one interval where the
target starts or stops being met (the cliff), every candidate decoded on the same prompts. Objectives:
- agreement: the fraction of prompts whose answer tokens equal those of the same schedule without any cache;
- accuracy: exact match (scored like eval); a candidate meets the target when it is at most `target` points below
  the best candidate found.
Decodes per prompt: at most 1 reference (no cache) + len(metrics) x (grid points + bisection steps), which is at
most 3 x (grid points + bisection steps) for the two drift metrics.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Callable

from dllm_trt.runtime.calibration import METRICS
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DEFAULT_WINDOW, DecodeOptions, build

from .scoring import is_correct

GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
BISECT_STEPS = 4
DEFAULT_TARGET = {"agreement": 0.99, "accuracy": 1.0}   # agreement: a fraction; accuracy: points below the best


@dataclass
class Point:
    """One candidate gamma measured on every calibration prompt."""
    gamma: float
    refresh_fraction: float
    agreement: float | None = None        # prompts whose answer tokens equal the reference's
    token_agreement: float | None = None  # equal tokens, position by position, over the longer answer
    accuracy: float | None = None         # exact match (problems with answers only)
    tokens_per_second: float = 0.0

    def score(self, objective: str) -> float:
        return self.agreement if objective == "agreement" else self.accuracy


def passes(objective: str, target: float) -> Callable[[Point, list[Point]], bool]:
    """Whether a point meets the target, given every point measured so far (accuracy is relative to the best)."""
    if objective == "agreement":
        def meets(p, points):
            return p.agreement >= target - 1e-12
    else:
        def meets(p, points):
            return 100 * p.accuracy >= 100 * max(q.accuracy for q in points) - target - 1e-9
    meets.objective = objective
    return meets


def choose(points: list[Point], meets) -> Point | None:
    """The point with the lowest refresh fraction that meets the target, or None. Points that tie on refresh
    fraction (the same refresh decisions on these prompts) go to the best score, then to the gamma nearest the middle
    of their range, so that a curve shifted a little on other prompts keeps it there."""
    ok = [p for p in points if meets(p, points)]
    if not ok:
        return None
    cheapest = min(p.refresh_fraction for p in ok)
    tied = [p for p in ok if p.refresh_fraction <= cheapest + 1e-12]
    best_score = max(p.score(objective) for p in tied) if (objective := getattr(meets, "objective", None)) else None
    if best_score is not None:
        tied = [p for p in tied if p.score(objective) >= best_score - 1e-12]
    middle = (min(p.gamma for p in tied) + max(p.gamma for p in tied)) / 2
    return min(tied, key=lambda p: (abs(p.gamma - middle), p.gamma))


def search(measure: Callable[[float], Point], meets, grid=GRID, steps: int = BISECT_STEPS) -> list[Point]:
    """Every point measured, by gamma: the grid, then `steps` bisections of the cliff. The cliff is the grid
    interval just below the cheapest passing point when its lower end fails (bisecting it finds a cheaper gamma
    that still passes), else the first interval where passing changes, else the one where the refresh fraction
    changes most; a flat curve is not bisected."""
    points = sorted((measure(g) for g in sorted(set(grid))), key=lambda p: p.gamma)
    ok = [meets(p, points) for p in points]
    best = choose(points, meets)
    i = points.index(best) if best is not None else None
    flips = [j for j in range(len(points) - 1) if ok[j] != ok[j + 1]]
    if i is not None and i > 0 and not ok[i - 1]:
        lo, hi = points[i - 1], points[i]
    elif flips:
        lo, hi = points[flips[0]], points[flips[0] + 1]
    else:
        jumps = [(points[j + 1].refresh_fraction - points[j].refresh_fraction, j) for j in range(len(points) - 1)]
        jump, j = max(jumps, default=(0.0, 0))
        if jump <= 0:
            return points
        lo, hi = points[j], points[j + 1]
    for _ in range(steps):
        mid = measure((lo.gamma + hi.gamma) / 2)
        points.append(mid)
        if meets(lo, points) != meets(hi, points):
            lo, hi = (mid, hi) if meets(mid, points) == meets(lo, points) else (lo, mid)
        else:  # the refresh-fraction cliff: keep the half where it changes more
            lo, hi = (lo, mid) if mid.refresh_fraction - lo.refresh_fraction >= hi.refresh_fraction - mid.refresh_fraction \
                else (mid, hi)
    return sorted(points, key=lambda p: p.gamma)


# ---- measuring on an engine ------------------------------------------------------------------------------------
@dataclass
class Calibration:
    objective: str
    target: float
    points: dict[str, list[Point]]            # per drift metric, by gamma
    chosen: dict[str, Point | None]           # per drift metric: meets the target at the fewest refreshes (None:
                                              # no candidate does)
    other: dict[str, Point | None]            # what the other objective would have picked among the same points
    decodes_per_prompt: int


def calibrate(backend, tokenizer, problems: list[dict], objective: str, target: float, base: DecodeOptions,
              gen_length: int, grid=GRID, steps: int = BISECT_STEPS, metrics=METRICS,
              progress: bool = True) -> Calibration:
    """Run the search for each drift metric on the same prompts; a metric for which no candidate meets the target
    has None as its choice (its measurements are still reported). `base` holds the schedule options (window,
    threshold, track_num, alignment)."""
    from tqdm import tqdm

    labelled = all(p["answer"] is not None for p in problems)
    prompts = [tokenizer.encode_prompt(p["question"], chat=True) for p in problems]
    if base.window is None and not base.uses_blocks:  # the reference (cache none) must slide the same window
        base = replace(base, window=DEFAULT_WINDOW)

    def decoder(options: DecodeOptions) -> Decoder:
        schedule, policy = build(replace(options, gen_length=gen_length), gen_length)
        return Decoder(backend, policy, schedule, tokenizer.decode)

    decoder(replace(base, cache="elastic", gamma=1.0)).generate(prompts[0])  # warm-up: one-off costs, untimed
    per_prompt = 1 + len(metrics) * (len(set(grid)) + steps)
    bar = tqdm(total=per_prompt * len(prompts), desc="calibrate", unit="decode", disable=not progress,
               file=sys.stderr)

    def decode(options: DecodeOptions):
        d = decoder(options)
        for ids in prompts:
            yield d.generate(ids)
            bar.update()

    reference = [r.token_ids for r in decode(replace(base, cache="none"))]

    def measure_with(metric: str):
        def measure(gamma: float) -> Point:
            refreshed = total = agree = same = longest = correct = tokens = 0
            seconds = 0.0
            options = replace(base, cache="elastic", gamma=round(gamma, 6), drift_metric=metric)
            for res, ref, problem in zip(decode(options), reference, problems):
                refreshed, total = refreshed + res.layer_steps_refreshed, total + res.layer_steps_total
                agree += res.token_ids == ref
                same += sum(a == b for a, b in zip(res.token_ids, ref))
                longest += max(len(res.token_ids), len(ref))
                tokens, seconds = tokens + res.tokens, seconds + res.seconds
                if labelled:
                    correct += is_correct(res.text, problem["answer"])
            n = len(prompts)
            return Point(round(gamma, 6), refreshed / max(total, 1), agree / n, same / max(longest, 1),
                         correct / n if labelled else None, tokens / seconds if seconds else 0.0)
        return measure

    meets = passes(objective, target)
    other_objective = "accuracy" if objective == "agreement" else "agreement"
    other_meets = passes(other_objective, DEFAULT_TARGET[other_objective])
    points, chosen, other = {}, {}, {}
    for metric in metrics:
        points[metric] = search(measure_with(metric), meets, grid, steps)
        chosen[metric] = choose(points[metric], meets)
        other[metric] = choose(points[metric], other_meets) if labelled or other_objective == "agreement" else None
    bar.total = bar.n  # a flat curve is not bisected: fewer decodes than planned
    bar.close()
    return Calibration(objective, target, points, chosen, other, 1 + sum(len(p) for p in points.values()))


def table(cal: Calibration) -> str:
    lines = ["| drift metric | gamma | refresh fraction | agreement (prompts) | agreement (tokens) | accuracy | tok/s | |",
             "|---|---|---|---|---|---|---|---|"]
    for metric, points in cal.points.items():
        for p in points:
            mark = "chosen" if p is cal.chosen[metric] else ""
            if p is cal.other.get(metric) and p is not cal.chosen[metric]:
                mark = "other objective"
            acc = "-" if p.accuracy is None else f"{100 * p.accuracy:.1f}%"
            lines.append(f"| {metric} | {p.gamma:g} | {p.refresh_fraction:.3f} | {100 * p.agreement:.1f}% | "
                         f"{100 * p.token_agreement:.1f}% | {acc} | {p.tokens_per_second:.1f} | {mark} |")
    return "\n".join(lines)


def record(cal: Calibration, data_path: str, prompts: int) -> dict:
    """The manifest's calibration block (runtime/calibration.py) for this result."""
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    from dllm_trt.runtime.manifest import sha256_file

    try:
        tool = version("dllm-trt")
    except PackageNotFoundError:
        tool = "unknown"
    return {"gamma": {m: p.gamma for m, p in cal.chosen.items()},
            "score": {m: p.score(cal.objective) for m, p in cal.chosen.items()},
            "refresh_fraction": {m: p.refresh_fraction for m, p in cal.chosen.items()},
            "objective": cal.objective, "target": cal.target, "prompts": prompts,
            "data_sha256": sha256_file(data_path), "tool_version": tool,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
