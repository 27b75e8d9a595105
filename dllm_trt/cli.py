"""`dllm-trt` command line. User mistakes end with one line on stderr and exit code 2, never a traceback.

This module sits above both halves of the package: runtime commands (generate, eval, check) and the torch-side
tools (export) are wired here, so that dllm_trt.runtime never imports dllm_trt.export.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .runtime.backends.base import BackendError
from .runtime.config import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "arith"


class UsageError(Exception):
    """A bad command-line value."""


def fail(msg: str, code: int = 2):
    print(f"dllm-trt: error: {msg}", file=sys.stderr)
    sys.exit(code)


# ---- decoding options shared by generate / eval / bench ---------------------------------------------------------
def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--cache", default="elastic", help="none | prefix | dual | elastic (default elastic)")
    g.add_argument("--gen-length", type=int, default=256, help="positions to generate (default 256)")
    g.add_argument("--block-length", type=int, help="LLaDA block schedule: block length (default 32)")
    g.add_argument("--steps", type=int, help="LLaDA block schedule: total steps (one token per step = gen length)")
    g.add_argument("--window", type=int, help="sliding-window schedule: the beta left-most masks (default 16)")
    g.add_argument("--threshold", type=float, help="unmask every position with confidence >= this (at least one)")
    g.add_argument("--tokens-per-step", type=int, default=1, help="window schedule without --threshold")
    g.add_argument("--early-stop", dest="early_stop", action="store_true", default=None,
                   help="stop at the first committed EOS (default: on for the window, off for blocks)")
    g.add_argument("--no-early-stop", dest="early_stop", action="store_false")
    e = p.add_argument_group("elastic cache")
    e.add_argument("--gamma", type=float, default=0.9, help="drift threshold: refresh when similarity < gamma")
    e.add_argument("--track-num", type=int, default=1, help="most-attended tokens tracked per layer")
    e.add_argument("--drift-metric", default="heads", choices=["heads", "keys"])
    e.add_argument("--refresh-alignment", default="rerun", choices=["rerun", "next"])
    b = p.add_argument_group("backend")
    b.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    b.add_argument("--layers-per-range", type=int, default=1, help="layers per piece (torch backend, export)")
    b.add_argument("--engine-cache", default="engines", help="where --model exports are cached (default engines/)")
    b.add_argument("--device", help="torch backend device (default cuda when present, else cpu)")
    b.add_argument("--dtype", default="fp32", help="torch backend dtype: fp32 | bf16 | fp16")


def make_schedule(a, cache: str, gen_length: int):
    from .runtime.schedule import BlockSchedule, WindowSchedule

    use_blocks = a.block_length is not None or a.steps is not None or (cache in ("none", "prefix", "dual")
                                                                         and a.window is None)
    if a.threshold is not None and not 0.0 <= a.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {a.threshold}")
    if a.tokens_per_step < 1:
        raise UsageError(f"--tokens-per-step must be at least 1, got {a.tokens_per_step}")
    try:
        if use_blocks:
            if a.window is not None:
                raise UsageError("choose either the block schedule (--block-length/--steps) or --window, not both")
            block = a.block_length or min(32, gen_length)
            if block < 1:
                raise UsageError(f"--block-length must be at least 1, got {block}")
            threshold = a.threshold
            steps = a.steps
            if steps is None and threshold is None:
                # LLaDA's baseline is one token per step; Fast-dLLM's caches come with its 0.9 threshold
                if cache == "none":
                    steps = gen_length
                else:
                    threshold = 0.9
            early = bool(a.early_stop) if a.early_stop is not None else False
            return BlockSchedule(gen_length, block, steps, threshold if steps is None else None, early)
        window = a.window if a.window is not None else 16
        if window < 1:
            raise UsageError(f"--window must be at least 1, got {window}")
        threshold = a.threshold if a.threshold is not None else (0.9 if a.tokens_per_step == 1 else None)
        early = True if a.early_stop is None else a.early_stop
        return WindowSchedule(gen_length, window, threshold, a.tokens_per_step, early)
    except ValueError as e:
        raise UsageError(str(e)) from None


def make_policy_from_args(a, cache: str):
    from .runtime.policies import make_policy

    if math.isnan(a.gamma) or not -1.0 <= a.gamma <= 2.0:
        raise UsageError(f"--gamma must be in [-1, 2] (similarities are in [-1, 1]; > 1 always refreshes), "
                         f"got {a.gamma}")
    if a.track_num < 1:
        raise UsageError(f"--track-num must be at least 1, got {a.track_num}")
    try:
        return make_policy(cache, a.gamma, a.track_num, a.drift_metric, a.refresh_alignment)
    except ValueError as e:
        raise UsageError(str(e)) from None


def open_backend(a):
    """(backend, directory with the tokenizer) for --engines DIR or --model DIR.

    A checkpoint runs on the torch backend when asked for; otherwise it is exported once into engines/ (cached by
    checkpoint fingerprint and export settings) and runs on ONNX Runtime like any exported engine."""
    from .runtime.engine import check_backend_name, export_cache_dir, open_checkpoint, open_engines

    check_backend_name(a.backend)
    if getattr(a, "engines", None):
        return open_engines(a.engines, a.backend), Path(a.engines)
    if a.backend == "torch":
        return open_checkpoint(a.model, a.layers_per_range, a.device, a.dtype), Path(a.model)
    from .runtime.config import layer_ranges, load_config

    try:
        layer_ranges(load_config(a.model).n_layers, a.layers_per_range)
    except ValueError as e:
        raise UsageError(str(e)) from None
    engines = export_cache_dir(a.model, a.engine_cache, layers_per_range=a.layers_per_range)
    if not (engines / "manifest.json").is_file():
        try:
            from .export.onnx_export import export_into
        except ImportError as e:
            raise BackendError(f"running a checkpoint on ONNX Runtime exports it first, which needs the export "
                               f"extra (pip install 'dllm-trt[export]'; missing {e.name}); or pass --engines DIR"
                               ) from None
        export_into(a.model, engines, layers_per_range=a.layers_per_range)
    return open_engines(engines, a.backend), engines


# ---- commands ----------------------------------------------------------------------------------------------------
def cmd_generate(a) -> None:
    from .runtime.decoder import Decoder
    from .runtime.tokenizer import TextTokenizer

    if not a.prompt or not a.prompt.strip():
        raise UsageError("--prompt is empty")
    if a.gen_length < 1:
        raise UsageError(f"--gen-length must be at least 1, got {a.gen_length}")
    schedule = make_schedule(a, a.cache, a.gen_length)
    policy = make_policy_from_args(a, a.cache)
    backend, source_dir = open_backend(a)
    tok = TextTokenizer(source_dir)
    prompt_ids = tok.encode_prompt(a.prompt, chat=a.chat)
    limit = backend.config.max_sequence_length
    if len(prompt_ids) + a.gen_length > limit:
        raise UsageError(f"prompt ({len(prompt_ids)} tokens) + gen length ({a.gen_length}) exceeds the model's "
                         f"maximum of {limit} positions; use --gen-length {max(limit - len(prompt_ids), 1)} or less")
    try:
        decoder = Decoder(backend, policy, schedule, detokenize=tok.decode)
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = decoder.generate(prompt_ids)
    if a.json:
        print(json.dumps(result.to_dict()))
        return
    print(result.text)
    extra = f", refresh fraction {result.refresh_fraction:.3f}" if policy.name == "elastic" else ""
    print(f"[{result.backend} | cache {policy.name} | {schedule.name} schedule] {result.tokens} tokens in "
          f"{result.steps} steps, {result.seconds:.2f} s, {result.tokens_per_second:.1f} tok/s{extra}",
          file=sys.stderr)


def _eval_inputs(a):
    from .runtime.evaluate import load_problems, standard_configs
    from .runtime.tokenizer import TextTokenizer

    if a.gen_length < 1:
        raise UsageError(f"--gen-length must be at least 1, got {a.gen_length}")
    if a.limit is not None and a.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {a.limit}")
    try:
        problems = load_problems(a.data, a.limit)
        configs = standard_configs([c.strip() for c in a.cache.split(",") if c.strip()], a.gamma, a.window or 16,
                                   not getattr(a, "no_llada_baseline", False))
    except OSError as e:
        raise UsageError(f"{a.data}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    backend, source = open_backend(a)
    return problems, configs, backend, TextTokenizer(source)


def cmd_eval(a) -> None:
    from .runtime.evaluate import evaluate, save_json, table

    problems, configs, backend, tok = _eval_inputs(a)
    summaries = evaluate(backend, tok, problems, configs, a.gen_length)
    print(table(summaries, f"{len(problems)} problems from {a.data}, gen length {a.gen_length}, "
                           f"backend {backend.describe()}"))
    save_json(a.out, summaries, {"data": a.data, "gen_length": a.gen_length, "backend": backend.describe(),
                                 "problems": len(problems)})
    print(f"results saved to {a.out}", file=sys.stderr)


def cmd_bench(a) -> None:
    from .runtime.evaluate import RunConfig, bench_speed, bench_table, evaluate, save_json, table

    try:
        lengths = [int(x) for x in a.gen_lengths.split(",")]
        gammas = [float(x) for x in a.gamma_sweep.split(",")] if a.gamma_sweep else []
    except ValueError:
        raise UsageError("--gen-lengths and --gamma-sweep take comma-separated numbers") from None
    if a.repeats < 1 or any(n < 1 for n in lengths):
        raise UsageError("--repeats and every gen length must be at least 1")
    a.gen_length, a.limit = max(lengths), a.prompts
    problems, configs, backend, tok = _eval_inputs(a)
    limit = backend.config.max_sequence_length
    prompts = [p["question"] for p in problems]
    results = {}
    for n in lengths:
        if max(len(tok.encode_prompt(p, chat=True)) for p in prompts) + n > limit:
            print(f"skipping gen length {n}: prompt + {n} exceeds the model's {limit} positions", file=sys.stderr)
            continue
        results[n] = bench_speed(backend, tok, prompts, configs, n, a.repeats)
    print(f"speed on {len(prompts)} prompts from {a.data}, median of {a.repeats} repeats, backend "
          f"{backend.describe()}\n")
    print(bench_table(results))
    report = {"speed": results}
    if gammas:
        from .runtime.evaluate import load_problems

        sweep_problems = load_problems(a.data, a.sweep_limit)
        sweep = [] if a.no_llada_baseline else [RunConfig("LLaDA baseline", "none", "block", steps_per_token=True)]
        sweep += [RunConfig("Fast-dLLM", "dual", "block"),
                 RunConfig("same schedule, no cache", "none", "window", window=a.window or 16)]
        sweep += [RunConfig(f"elastic gamma {g}", "elastic", "window", window=a.window or 16, gamma=g) for g in gammas]
        summaries = evaluate(backend, tok, sweep_problems, sweep, a.sweep_gen_length)
        print()
        print(table(summaries, f"gamma sweep: {len(sweep_problems)} problems, gen length {a.sweep_gen_length}"))
        report["gamma_sweep"] = [s.row() for s in summaries]
        if a.plot:
            plot_sweep(summaries, a.plot)
            print(f"plot saved to {a.plot}", file=sys.stderr)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"results saved to {a.out}", file=sys.stderr)


def plot_sweep(summaries, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    elastic = [s for s in summaries if s.label.startswith("elastic")]
    ax.plot([s.tokens_per_second for s in elastic], [100 * s.accuracy for s in elastic], "o-", label="Elastic-Cache")
    for s in elastic:
        ax.annotate(s.label.split()[-1], (s.tokens_per_second, 100 * s.accuracy), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for s, marker in zip([s for s in summaries if not s.label.startswith("elastic")], "s^D"):
        ax.plot([s.tokens_per_second], [100 * s.accuracy], marker, label=s.label)
    ax.set_xlabel("tokens/s (generated tokens up to EOS)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("gamma sweep: accuracy vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_serve(a) -> None:
    from .runtime.api import Engine

    try:
        from .runtime.server import serve
        import fastapi, uvicorn  # noqa: E401, F401
    except ImportError as e:
        raise UsageError(f"serving needs the serve extra: pip install 'dllm-trt[serve]' (missing {e.name})") from None
    if not 1 <= a.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {a.port}")
    engine = Engine.load(a.engines, a.backend)
    print(f"serving {engine.name} ({engine.backend.describe()}) on http://{a.host}:{a.port}/v1", file=sys.stderr)
    serve(engine, a.host, a.port, a.max_queue)


def cmd_export(a) -> None:
    from .export.onnx_export import export_model

    export_model(a.model, a.out, layers_per_range=a.layers_per_range, dtype=a.dtype, opset=a.opset,
                 max_len=a.max_len, max_active=a.max_active)


def cmd_check(a) -> None:
    from .export.check import check_engines, format_table

    rows = check_engines(a.engines, a.model)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} outputs within tolerance", file=sys.stderr)
    if bad:
        sys.exit(1)


def cmd_doctor(a) -> None:
    from .runtime.doctor import report

    print("\n".join(report()))


def cmd_build(a) -> None:
    from .runtime.backends.tensorrt_backend import build_plans

    build_plans(a.engines, a.precision, a.max_len, a.max_active, a.opt_level)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dllm-trt", description="Diffusion LM runtime with Elastic-Cache.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"LLaDA checkpoint directory (default: the bundled {DEFAULT_MODEL.name})")
    src.add_argument("--engines", help="exported engine directory (manifest.json)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats)")
    add_decoding_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="accuracy and speed of cache policies side by side on a GSM8K-style JSONL")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"LLaDA checkpoint directory (default: the bundled {DEFAULT_MODEL.name})")
    src.add_argument("--engines", help="exported engine directory (manifest.json)")
    e.add_argument("--data", required=True, help="JSONL with 'question' and 'answer' ('... #### N') per line")
    e.add_argument("--limit", type=int, help="first N problems only")
    e.add_argument("--out", default="eval-results.json", help="where to save the results as JSON")
    e.add_argument("--no-llada-baseline", action="store_true",
                   help="leave out the LLaDA baseline (one token per step: much the slowest to run)")
    add_decoding_args(e)
    e.set_defaults(func=cmd_eval, cache="none,dual,elastic", gen_length=128)

    bn = sub.add_parser("bench", help="speed of cache policies side by side at several gen lengths; gamma sweep")
    src = bn.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"LLaDA checkpoint directory (default: the bundled {DEFAULT_MODEL.name})")
    src.add_argument("--engines", help="exported engine directory (manifest.json)")
    bn.add_argument("--data", required=True, help="JSONL whose questions are the prompts")
    bn.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    bn.add_argument("--gen-lengths", default="128,256,512")
    bn.add_argument("--repeats", type=int, default=3)
    bn.add_argument("--gamma-sweep", help="comma-separated gammas for an accuracy-vs-speed sweep")
    bn.add_argument("--sweep-limit", type=int, default=100, help="problems in the sweep (default 100)")
    bn.add_argument("--sweep-gen-length", type=int, default=128)
    bn.add_argument("--plot", help="PNG path for the sweep plot (needs matplotlib)")
    bn.add_argument("--no-llada-baseline", action="store_true",
                    help="leave out the LLaDA baseline (one token per step: much the slowest to run)")
    bn.add_argument("--out", default="bench-results.json")
    add_decoding_args(bn)
    bn.set_defaults(func=cmd_bench, cache="none,dual,elastic")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server over exported engines")
    sv.add_argument("--engines", required=True, help="exported engine directory (manifest.json)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt")
    sv.add_argument("--max-queue", type=int, default=16, help="requests in progress before 503 (default 16)")
    sv.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="export a checkpoint as ONNX pieces + manifest.json")
    x.add_argument("--model", required=True, help="LLaDA checkpoint directory")
    x.add_argument("--out", required=True, help="output directory, e.g. engines/NAME")
    x.add_argument("--layers-per-range", type=int, default=1)
    x.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 for ONNX Runtime on CPU; bf16/fp16 for TensorRT")
    x.add_argument("--opset", type=int, default=20, choices=[20, 23])
    x.add_argument("--max-len", type=int, help="largest canvas (prompt + gen length); default: the model's maximum")
    x.add_argument("--max-active", type=int, default=256, help="largest number of query rows in a window pass")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("check", help="compare every exported piece with the PyTorch reference")
    c.add_argument("engines", help="exported engine directory")
    c.add_argument("--model", help="source checkpoint (default: the one recorded in manifest.json)")
    c.set_defaults(func=cmd_check)

    bld = sub.add_parser("build", help="build TensorRT plans for this GPU (once; a no-op when up to date)")
    bld.add_argument("engines", help="exported engine directory (export with --dtype bf16 or fp16 for speed)")
    bld.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    bld.add_argument("--max-len", type=int, help="largest canvas (default: the export's)")
    bld.add_argument("--max-active", type=int, help="largest window pass (default: the export's)")
    bld.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5")
    bld.set_defaults(func=cmd_build)

    d = sub.add_parser("doctor", help="what this machine has and which backends are usable")
    d.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) is None and getattr(args, "engines", None) is None:
        args.model = str(DEFAULT_MODEL)
    try:
        args.func(args)
    except (UsageError, ModelError, BackendError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)


if __name__ == "__main__":
    main()
