"""Accuracy and speed of decoding configurations, side by side on the same problems in one process.

Every report uses the same three named baselines:
- "LLaDA baseline": block 32, one token per step, no cache (the papers' baseline);
- "Fast-dLLM": dual cache, confidence threshold 0.9, block 32;
- "same schedule, no cache": Elastic-Cache's sliding window (16) and threshold (0.9) without any cache, which
  isolates what the cache itself buys.
Throughput counts generated tokens up to the first EOS only (never prompt tokens, EOS padding or leftover masks).
"""
from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field, replace

from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DecodeOptions, build, resolve_gamma

from .scoring import extract_answer, is_correct

BASELINES = ("LLaDA baseline", "Fast-dLLM", "same schedule, no cache")


@dataclass(frozen=True)
class RunConfig:
    label: str
    options: DecodeOptions

    def make(self, backend, gen_length: int, detokenize) -> Decoder:
        schedule, policy = build(replace(self.options, gen_length=gen_length), gen_length, backend.calibration)
        return Decoder(backend, policy, schedule, detokenize)


def standard_configs(caches: list[str], gamma: float | str | None = None, window: int = 16,
                     llada_baseline: bool = True, calibration: dict | None = None) -> list[RunConfig]:
    """The three baselines first, then one configuration per requested cache policy (defaults as in the papers).
    The LLaDA baseline (one token per step) is by far the slowest to run; it can be left out of long runs. An unset
    gamma is the engine's calibrated one (`calibration`: its calibration block), else 0.9; labels say which."""
    configs = [RunConfig("LLaDA baseline", DecodeOptions(cache="none"))] if llada_baseline else []
    configs += [RunConfig("Fast-dLLM", DecodeOptions(cache="dual")),
                RunConfig("same schedule, no cache", DecodeOptions(cache="none", window=window))]
    for cache in caches:
        if cache in ("none", "dual"):
            continue  # already baselines (both no-cache schedules; Fast-dLLM's dual cache)
        if cache == "prefix":
            configs.append(RunConfig("Fast-dLLM prefix", DecodeOptions(cache="prefix")))
        elif cache == "elastic":
            options = DecodeOptions(cache="elastic", window=window, gamma=gamma)
            value, source = resolve_gamma(options, calibration)
            configs.append(RunConfig(f"Elastic-Cache (gamma {value:g}{', calibrated' * (source == 'calibrated')})",
                                     options))
        else:
            raise ValueError(f"unknown cache policy {cache!r} (choose none, prefix, dual or elastic)")
    return configs


@dataclass
class Summary:
    label: str
    problems: int = 0
    correct: int = 0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    layer_steps_refreshed: int = 0
    layer_steps_total: int = 0
    outputs: list = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def row(self) -> dict:
        return {"label": self.label, "problems": self.problems, "accuracy": self.accuracy,
                "tokens_per_second": self.tokens_per_second, "steps_per_problem": self.steps / max(self.problems, 1),
                "tokens_per_step": self.tokens / max(self.steps, 1),
                "refresh_fraction": self.layer_steps_refreshed / max(self.layer_steps_total, 1),
                "tokens": self.tokens, "seconds": self.seconds}


MAX_LINE_BYTES = 1 << 20     # one problem per line; a longer line is not a problem (and /dev/zero has no end)
MAX_DATA_BYTES = 256 << 20   # an endless source (a pipe, /dev/urandom) is refused instead of read into memory


def load_problems(path: str, limit: int | None = None, need_answer: bool = True) -> list[dict]:
    """The JSON-lines problems of `path` ({"question", "answer"} per line), the first `limit` of them; without
    `need_answer`, lines may hold only a question (answer None). Every malformed input is a ValueError naming the
    file and line."""
    problems, read = [], 0
    with open(path, "rb") as f:
        for i in itertools.count(1):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            read += len(line)
            if len(line) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{i}: line longer than {MAX_LINE_BYTES >> 20} MiB; expected one JSON "
                                 f"object per line")
            if read > MAX_DATA_BYTES:
                raise ValueError(f"{path}: more than {MAX_DATA_BYTES >> 20} MiB without reaching --limit; give "
                                 f"--limit or a smaller file")
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8"))
                answer = item["answer"] if need_answer or "answer" in item else None
                problems.append({"question": str(item["question"]), "answer": None if answer is None else str(answer)})
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text ({e.reason})") from None
            except RecursionError:
                raise ValueError(f"{path}:{i}: JSON nested too deeply") from None
            except (ValueError, KeyError, TypeError):  # ValueError: bad JSON, 5000-digit integers
                fields = "'question' and 'answer'" if need_answer else "'question'"
                raise ValueError(f"{path}:{i}: expected a JSON object with {fields}") from None
            if limit and len(problems) >= limit:
                break
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def evaluate(backend, tokenizer, problems: list[dict], configs: list[RunConfig], gen_length: int,
             progress: bool = True) -> list[Summary]:
    """Run every configuration on every problem; configurations alternate per problem so that drift in machine
    load affects all of them alike."""
    from tqdm import tqdm

    prompts = [tokenizer.encode_prompt(p["question"], chat=True) for p in problems]
    summaries = [Summary(c.label) for c in configs]
    for c in configs:  # warm-up, untimed: first calls pay one-off allocation costs
        c.make(backend, gen_length, tokenizer.decode).generate(prompts[0])
    bar = tqdm(total=len(problems) * len(configs), desc="eval", unit="run", disable=not progress, file=sys.stderr)
    for problem, prompt in zip(problems, prompts):
        for cfg, summary in zip(configs, summaries):
            res = cfg.make(backend, gen_length, tokenizer.decode).generate(prompt)
            ok = is_correct(res.text, problem["answer"])
            summary.problems += 1
            summary.correct += ok
            summary.tokens += res.tokens
            summary.steps += res.steps
            summary.seconds += res.seconds
            summary.layer_steps_refreshed += res.layer_steps_refreshed
            summary.layer_steps_total += res.layer_steps_total
            summary.outputs.append({"answer": extract_answer(res.text), "correct": ok, "tokens": res.tokens,
                                    "steps": res.steps, "token_ids": res.token_ids})
            bar.update()
    bar.close()
    return summaries


def table(summaries: list[Summary], title: str = "") -> str:
    base = {s.label: s.tokens_per_second for s in summaries if s.label in BASELINES}
    head = ("| configuration | accuracy | tok/s | steps/problem | tokens/step | refresh fraction | "
            + " | ".join(f"vs {b}" for b in BASELINES) + " |")
    lines = ([title, ""] if title else []) + [head, "|" + "---|" * (6 + len(BASELINES))]
    for s in summaries:
        r = s.row()
        ratios = " | ".join(f"{r['tokens_per_second'] / base[b]:.2f}x" if base.get(b) else "-" for b in BASELINES)
        lines.append(f"| {s.label} | {100 * r['accuracy']:.1f}% | {r['tokens_per_second']:.1f} | "
                     f"{r['steps_per_problem']:.1f} | {r['tokens_per_step']:.2f} | {r['refresh_fraction']:.3f} | "
                     f"{ratios} |")
    return "\n".join(lines)


def save_json(path: str, summaries: list[Summary], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [{**s.row(), "outputs": s.outputs} for s in summaries]}, f, indent=1)



def bench_speed(backend, tokenizer, prompts: list[str], configs: list[RunConfig], gen_length: int, repeats: int,
                progress: bool = True) -> dict[str, dict]:
    """Median over repeats of (generated tokens up to EOS / seconds) over all prompts, per configuration.
    Configurations alternate inside each repeat, on the same prompts."""
    import statistics

    from tqdm import tqdm

    ids = [tokenizer.encode_prompt(p, chat=True) for p in prompts]
    for c in configs:
        c.make(backend, gen_length, tokenizer.decode).generate(ids[0])  # warm-up
    per_repeat = {c.label: [] for c in configs}
    steps = {c.label: 0 for c in configs}
    tokens = {c.label: 0 for c in configs}
    bar = tqdm(total=repeats * len(configs) * len(ids), desc=f"bench gen {gen_length}", unit="run",
               disable=not progress, file=sys.stderr)
    for _ in range(repeats):
        for c in configs:
            n_tokens = seconds = 0.0
            for p in ids:
                res = c.make(backend, gen_length, tokenizer.decode).generate(p)
                n_tokens, seconds = n_tokens + res.tokens, seconds + res.seconds
                steps[c.label] += res.steps
                tokens[c.label] += res.tokens
                bar.update()
            per_repeat[c.label].append(n_tokens / seconds if seconds else 0.0)
    bar.close()
    return {label: {"tokens_per_second": statistics.median(v), "runs": v,
                    "tokens_per_step": tokens[label] / max(steps[label], 1)} for label, v in per_repeat.items()}


def bench_table(results: dict[int, dict[str, dict]]) -> str:
    lines = ["| gen length | configuration | tok/s (median) | tokens/step | "
             + " | ".join(f"vs {b}" for b in BASELINES) + " |", "|" + "---|" * (4 + len(BASELINES))]
    for gen, rows in results.items():
        for label, r in rows.items():
            ratios = " | ".join(f"{r['tokens_per_second'] / rows[b]['tokens_per_second']:.2f}x"
                                if rows.get(b, {}).get("tokens_per_second") else "-" for b in BASELINES)
            lines.append(f"| {gen} | {label} | {r['tokens_per_second']:.1f} | {r['tokens_per_step']:.2f} | {ratios} |")
    return "\n".join(lines)
