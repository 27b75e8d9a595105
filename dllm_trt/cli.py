"""`dllm-trt` command line. User mistakes end with one line on stderr and exit code 2, never a traceback.

This module sits above both halves of the package: runtime commands (generate, eval, check) and the torch-side
tools (export) are wired here, so that dllm_trt.runtime never imports dllm_trt.export.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

from .evaluate.outputs import OutputError, check_output, check_plot, save
from .runtime.backends.base import BackendError
from .runtime.config import ModelError
from .runtime.manifest import DEFAULT_MAX_BATCH, MAX_BATCH_LIMIT
from .runtime.options import (CALIBRATED, DEFAULT_GAMMA, DEFAULT_GEN_LENGTH, DEFAULT_WINDOW, DecodeOptions,
                              OptionError, PromptTooLong, check_gamma, check_schedule, decode_options,
                              default_gen_length, option_names, resolve_gamma)

from .evaluate.calibrate import BISECT_STEPS, GRID

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
    g.add_argument("--gen-length", type=int, help=f"positions to generate (default: the checkpoint's max_new_tokens, "
                                                  f"else {DEFAULT_GEN_LENGTH}; at most what fits after the prompt)")
    g.add_argument("--block-length", type=int, help="LLaDA block schedule: block length (default 32)")
    g.add_argument("--steps", type=int, help="LLaDA block schedule: total steps (one token per step = gen length)")
    g.add_argument("--window", type=int, help="sliding-window schedule: the beta left-most masks (default 16)")
    g.add_argument("--threshold", type=float, help="unmask every position with confidence >= this (at least one)")
    g.add_argument("--tokens-per-step", type=int, default=1, help="window schedule without --threshold")
    g.add_argument("--early-stop", dest="early_stop", action="store_true", default=None,
                   help="stop at the first committed end token (default: on for the window, off for blocks)")
    g.add_argument("--no-early-stop", dest="early_stop", action="store_false")
    e = p.add_argument_group("elastic cache")
    e.add_argument("--gamma", type=gamma_arg, help=f"drift threshold: refresh when similarity < gamma (default: the "
                   f"engine's calibrated gamma, else {DEFAULT_GAMMA}; '{CALIBRATED}': the calibrated one or an error)")
    e.add_argument("--track-num", type=int, default=1, help="most-attended tokens tracked per layer")
    e.add_argument("--drift-metric", default="heads", choices=["heads", "keys"])
    e.add_argument("--refresh-alignment", default="rerun", choices=["rerun", "next"])
    b = p.add_argument_group("backend")
    b.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    b.add_argument("--layers-per-range", type=int, default=1, help="layers per piece (torch backend, export)")
    b.add_argument("--engine-cache", default="engines", help="where --model exports are cached (default engines/)")
    b.add_argument("--device", help="torch backend device: cpu or cuda (default cuda when present, else cpu)")
    b.add_argument("--dtype", default="fp32", help="torch backend dtype: fp32 | bf16 | fp16")
    b.add_argument("--cuda-graphs", action="store_true",
                   help="torch backend: bucketed fixed-shape steps replayed as CUDA graphs (not yet run on a GPU)")
    add_threads_arg(b)


def gamma_arg(text: str) -> float | str:
    if text == CALIBRATED:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or '{CALIBRATED}', got {text!r}") from None


def add_threads_arg(p) -> None:
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per piece (default: $DLLM_TRT_THREADS, else "
                                                "the physical cores this process may use)")


def check_threads(a) -> None:
    """--threads before anything starts; the commands hand it to the backend they open."""
    if getattr(a, "threads", None) is not None and a.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {a.threads}")


def run_inputs(a) -> tuple:
    """What an eval/bench run reads, which its --out and --plot must not overwrite."""
    return a.data, getattr(a, "model", None), getattr(a, "engines", None)


def flag_error(e: OptionError) -> UsageError:
    """An option error worded with the command-line flag's name."""
    return UsageError(f"--{e.field.replace('_', '-')} {e.problem}")


def flag_options(a, **overrides) -> DecodeOptions:
    """The decoding flags this command has (DecodeOptions' fields), validated: the same options the API and the
    server take."""
    given = {name: getattr(a, name) for name in option_names() if hasattr(a, name)}
    try:
        return decode_options(given | overrides)
    except OptionError as e:
        raise flag_error(e) from None


def open_backend(a):
    """(backend, directory with the tokenizer) for --engines DIR or --model DIR.

    A checkpoint runs on the torch backend when asked for; otherwise it is exported once into engines/ (cached by
    checkpoint fingerprint and export settings) and runs on ONNX Runtime like any exported engine."""
    from .runtime.engine import check_backend_name, export_cache_dir, open_checkpoint, open_engines

    check_backend_name(a.backend)
    if getattr(a, "engines", None):
        return open_engines(a.engines, a.backend, a.threads), Path(a.engines)
    if a.backend == "torch":
        return open_checkpoint(a.model, a.layers_per_range, a.device, a.dtype, a.cuda_graphs), Path(a.model)
    from .runtime.config import layer_ranges, load_config

    cfg = load_config(a.model)
    try:
        layer_ranges(cfg.n_layers, a.layers_per_range)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if getattr(a, "gen_length", None) is not None and a.gen_length >= cfg.max_sequence_length:  # before exporting
        raise UsageError(f"--gen-length {a.gen_length} exceeds the {cfg.max_sequence_length} positions available "
                         f"(prompt included)")
    engines = export_cache_dir(a.model, a.engine_cache, layers_per_range=a.layers_per_range)
    if not (engines / "manifest.json").is_file():
        try:
            from .export.out_folder import export_into
        except ImportError as e:
            raise BackendError(f"running a checkpoint on ONNX Runtime exports it first, which needs the export "
                               f"extra (pip install 'dllm-trt[export]'; missing {e.name}); or pass --engines DIR"
                               ) from None
        print(f"exporting {a.model} to {engines} (once; later runs reuse it)", file=sys.stderr)
        export_into(a.model, engines, layers_per_range=a.layers_per_range)
    return open_engines(engines, a.backend, a.threads), engines


def engine_on(backend, source: Path, max_batch: int | None = None):
    """The Engine (runtime/api.py) over an opened backend, with the tokenizer found in `source`."""
    from .runtime.api import Engine
    from .runtime.tokenizer import TextTokenizer

    return Engine(backend, TextTokenizer(source), source.name, max_batch=max_batch)


# ---- commands ----------------------------------------------------------------------------------------------------
def cmd_generate(a) -> bool:
    if not a.prompt or not a.prompt.strip():
        raise UsageError("--prompt is empty")
    opts = flag_options(a)
    try:
        check_schedule(opts)  # e.g. blocks that do not divide --gen-length: refused before any export
    except OptionError as e:
        raise flag_error(e) from None
    engine = engine_on(*open_backend(a))
    prompt = [{"role": "user", "content": a.prompt}] if a.chat else a.prompt
    prepared = plan_prompt(engine, prompt, opts)
    result = engine.generate(prompt, prepared=prepared)
    print_result(a, engine, prepared, result)
    return engine.backend.name == "onnxruntime"  # nothing to save at exit: TensorRT for RTX saves its runtime cache


def plan_prompt(engine, prompt, opts: DecodeOptions) -> tuple:
    """Engine.prepare's (decoder, prompt ids, options), its errors worded for the command line; says so on stderr
    when the default gen length was shortened to fit."""
    try:
        prompt_ids = engine.encode(prompt)
    except ValueError as e:  # e.g. text that is not valid Unicode, a chat template that raises
        raise UsageError(f"--prompt: {e}") from None
    try:
        decoder, _, _ = engine.plan(prompt_ids, opts)
    except OptionError as e:
        raise flag_error(e) from None
    except PromptTooLong as e:
        raise UsageError(f"{e} (--gen-length)") from None
    gen_length = decoder.schedule.gen_length
    if opts.gen_length is None and gen_length != default_gen_length(engine.backend.config.default_gen_length):
        print(f"gen length {gen_length}: what fits in the {engine.max_positions} positions after the "
              f"{len(prompt_ids)}-token prompt (--gen-length to choose)", file=sys.stderr)
    return decoder, prompt_ids, opts


def print_result(a, engine, prepared: tuple, result) -> None:
    """The text and a stats line on stderr, or with --json one JSON object with every stat."""
    decoder, _, opts = prepared
    gamma, gamma_source = resolve_gamma(opts, engine.backend.calibration)  # as plan_prompt resolved it
    if a.json:
        from .runtime.memory import peak_rss_bytes

        print(json.dumps(result.to_dict() | {"peak_rss_bytes": peak_rss_bytes(), "weight_bytes": engine.weight_bytes,
                                             "gamma": gamma, "gamma_source": gamma_source}))
        return
    print(result.text)
    policy, schedule = decoder.policy, decoder.schedule
    extra = (f", gamma {gamma:g} ({gamma_source}), refresh fraction {result.refresh_fraction:.3f}"
             if policy.name == "elastic" else "")
    print(f"[{result.backend} | cache {policy.name} | {schedule.name} schedule] {result.tokens} tokens in "
          f"{result.steps} steps, {result.seconds:.2f} s, {result.tokens_per_second:.1f} tok/s{extra}",
          file=sys.stderr)


def _eval_inputs(a):
    from .evaluate.harness import load_problems, standard_configs

    if a.limit is not None and a.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {a.limit}")
    flag_options(a, cache="elastic")  # the shared flags (gen length, window, gamma, ...) are valid
    caches = [c.strip() for c in a.cache.split(",") if c.strip()]

    def configs_for(calibration):
        return standard_configs(caches, a.gamma, a.window or DEFAULT_WINDOW,
                                not getattr(a, "no_llada_baseline", False), calibration)

    try:
        problems = load_problems(a.data, a.limit)
        configs_for({"gamma": dict.fromkeys(("heads", "keys"), DEFAULT_GAMMA)})  # cache names, before any export
    except OSError as e:
        raise UsageError(f"{a.data}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    backend, source = open_backend(a)
    try:
        configs = configs_for(backend.calibration)
    except OptionError as e:  # --gamma calibrated on an engine without a calibration
        raise flag_error(e) from None
    engine = engine_on(backend, source)
    return problems, configs, engine.backend, engine.tokenizer


def cmd_eval(a) -> None:
    from .evaluate.harness import evaluate, save_json, table

    check_output(a.out, "--out", run_inputs(a))
    problems, configs, backend, tok = _eval_inputs(a)
    summaries = evaluate(backend, tok, problems, configs, a.gen_length)
    print(table(summaries, f"{len(problems)} problems from {a.data}, gen length {a.gen_length}, "
                           f"backend {backend.describe()}"))
    if a.out:
        meta = {"data": a.data, "gen_length": a.gen_length, "backend": backend.describe(), "problems": len(problems)}
        if not save(a.out, "results", lambda path: save_json(path, summaries, meta)):
            sys.exit(1)


def cmd_bench(a) -> None:
    from .evaluate.harness import RunConfig, bench_speed, bench_table, evaluate, load_problems, standard_configs, table

    try:
        lengths = [int(x) for x in a.gen_lengths.split(",")]
        gammas = [float(x) for x in a.gamma_sweep.split(",")] if a.gamma_sweep else []
    except ValueError:
        raise UsageError("--gen-lengths and --gamma-sweep take comma-separated numbers") from None
    if a.repeats < 1 or any(n < 1 for n in lengths):
        raise UsageError("--repeats and every gen length must be at least 1")
    if a.plot and not gammas:
        raise UsageError("--plot draws the gamma sweep: give --gamma-sweep too")
    for g in gammas:
        try:
            check_gamma(g)
        except OptionError as e:
            raise UsageError(f"--gamma-sweep: every gamma {e.problem}") from None
    try:
        clients = [int(x) for x in a.concurrency.split(",")] if a.concurrency else []
    except ValueError:
        raise UsageError("--concurrency takes comma-separated numbers of clients, e.g. 1,4,16,64") from None
    if any(not 1 <= c <= MAX_BATCH_LIMIT for c in clients) or (
            a.max_batch is not None and not 1 <= a.max_batch <= MAX_BATCH_LIMIT):
        raise UsageError(f"--concurrency and --max-batch take numbers in 1..{MAX_BATCH_LIMIT}")
    if a.max_batch is not None and not clients:
        raise UsageError("--max-batch goes with --concurrency (the batched rows of the serving load)")
    if clients and (gammas or a.plot):
        raise UsageError("--concurrency is a benchmark of its own: run --gamma-sweep separately")
    check_output(a.out, "--out", run_inputs(a))
    check_plot(a.plot, "--plot", run_inputs(a))
    a.gen_length = max(lengths) if not clients else lengths[0]
    a.limit = a.prompts if a.prompts is not None else (4 * max(clients) if clients else 8)
    problems, configs, backend, tok = _eval_inputs(a)
    if clients:
        return bench_load(a, problems, backend, clients, lengths[0])
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
    report, saved = {"speed": results}, True
    if gammas:
        sweep_problems = load_problems(a.data, a.sweep_limit)
        window = a.window or DEFAULT_WINDOW
        sweep = standard_configs([], window=window, llada_baseline=not a.no_llada_baseline)
        sweep += [RunConfig(f"elastic gamma {g}", DecodeOptions(cache="elastic", window=window, gamma=g))
                  for g in gammas]
        calibrated = backend.calibration.get("gamma", {}).get("heads")
        if calibrated is not None:  # the calibrated point beside the hand-picked ones (drift metric heads, as they)
            sweep.append(RunConfig(f"elastic gamma {calibrated:g} (calibrated)",
                                   DecodeOptions(cache="elastic", window=window, gamma=calibrated)))
        summaries = evaluate(backend, tok, sweep_problems, sweep, a.sweep_gen_length)
        print()
        print(table(summaries, f"gamma sweep: {len(sweep_problems)} problems, gen length {a.sweep_gen_length}"))
        report["gamma_sweep"] = [s.row() for s in summaries]
        if a.plot:
            from .evaluate.plot import plot_sweep

            saved = save(a.plot, "plot", lambda path: plot_sweep(summaries, path))
    if a.out:
        saved = save(a.out, "results", lambda path: Path(path).write_text(json.dumps(report, indent=1))) and saved
    if not saved:
        sys.exit(1)


def bench_load(a, problems, backend, clients: list[int], gen_length: int) -> None:
    """bench --concurrency: the same prompts from C client threads, one request at a time vs batched."""
    from .evaluate.load import load_table, run_load

    source = Path(a.engines or a.model or DEFAULT_MODEL)
    one = engine_on(backend, source, max_batch=1)
    batched = engine_on(backend, source, max_batch=a.max_batch)
    if batched.max_batch == 1:
        print(f"the {backend.name} backend decodes one request at a time: both rows measure the same thing",
              file=sys.stderr)
    warm = [[{"role": "user", "content": p["question"]}] for p in problems[: batched.max_batch]]
    one.generate_batch(warm[:1], max_tokens=gen_length)   # warm-up: pages in, arenas grown at batch shapes too
    batched.generate_batch(warm, max_tokens=gen_length)
    results = []
    for c in clients:
        for mode, engine in (("one at a time", one), (f"batched (max {batched.max_batch})", batched)):
            results.append(run_load(engine, problems, c, mode, max_tokens=gen_length))
    print(f"serving load in process: {len(problems)} chat prompts from {a.data}, max_tokens {gen_length}, engine "
          f"defaults otherwise, backend {backend.describe()}\n")
    print(load_table(results))
    if a.out and not save(a.out, "results", lambda path: Path(path).write_text(
            json.dumps({"load": [r.row() for r in results]}, indent=1))):
        sys.exit(1)


def cmd_calibrate(a) -> None:
    from .evaluate.calibrate import DEFAULT_TARGET, calibrate, record, table
    from .evaluate.harness import load_problems
    from .runtime.api import Engine
    from .runtime.calibration import write_calibration
    from .runtime.options import GAMMA_RANGE

    target = DEFAULT_TARGET[a.objective] if a.target is None else a.target
    top = 1.0 if a.objective == "agreement" else 100.0
    if not (math.isfinite(target) and 0 <= target <= top):
        unit = "a fraction of prompts" if a.objective == "agreement" else "points below the best accuracy"
        raise UsageError(f"--target for {a.objective} is {unit}, in [0, {top:g}]; got {a.target}")
    if a.prompts < 1:
        raise UsageError(f"--prompts must be at least 1, got {a.prompts}")
    if not 0 <= a.bisect_steps <= 20:
        raise UsageError(f"--bisect-steps must be in 0..20, got {a.bisect_steps}")
    try:
        grid = sorted({float(x) for x in a.grid.split(",")})
    except ValueError:
        raise UsageError(f"--grid takes comma-separated gammas, got {a.grid!r}") from None
    try:
        for g in grid:
            check_gamma(g)
    except OptionError:
        raise UsageError(f"--grid: every gamma must be in [{GAMMA_RANGE[0]:g}, {GAMMA_RANGE[1]:g}], got {a.grid!r}"
                         ) from None
    base = flag_options(a, cache="elastic")
    try:
        problems = load_problems(a.data, a.prompts, need_answer=a.objective == "accuracy")
    except OSError as e:
        raise UsageError(f"{a.data}: {e.strerror}") from None
    except ValueError as e:
        hint = (" (--objective accuracy scores an 'answer' on every line; --objective agreement needs only "
                "questions)" if a.objective == "accuracy" and "'answer'" in str(e) else "")
        raise UsageError(f"{e}{hint}") from None
    if not (Path(a.engines) / "manifest.json").is_file():
        raise UsageError(f"{a.engines}: not an engine folder (no manifest.json); calibrate records its result "
                         f"there: export first (dllm-trt export --model DIR --out {a.engines})")
    engine = Engine.load(a.engines, a.backend, a.threads)
    backend, tok, limit = engine.backend, engine.tokenizer, engine.max_positions
    gen_length = base.gen_length or default_gen_length(backend.config.default_gen_length)
    longest = max(len(tok.encode_prompt(p["question"], chat=True)) for p in problems)
    if longest + gen_length > limit:
        raise UsageError(f"the longest prompt ({longest} tokens) + gen length {gen_length} exceeds the {limit} "
                         f"positions available (--gen-length)")
    try:
        cal = calibrate(backend, tok, problems, a.objective, target, base, gen_length, grid, a.bisect_steps)
    except OptionError as e:
        raise flag_error(e) from None
    print(f"calibration on {len(problems)} prompts from {a.data}, gen length {gen_length}, backend "
          f"{backend.describe()}\n")
    print(table(cal))
    print()
    goal = (f"answer tokens equal to the same schedule without cache on >= {100 * target:g}% of prompts"
            if a.objective == "agreement" else f"accuracy at most {target:g} point{'s' * (target != 1)} below the best gamma found")
    print(f"objective optimised: {a.objective} ({goal}); chosen: "
          + ", ".join(f"{m} {p.gamma:g} (refresh fraction {p.refresh_fraction:.3f})" if p else f"{m} none"
                      for m, p in cal.chosen.items()))
    other = "accuracy" if a.objective == "agreement" else "agreement"
    if any(cal.other.values()):
        print(f"the {other} objective (default target {DEFAULT_TARGET[other]:g}) would have picked: "
              + ", ".join(f"{m} {p.gamma:g} (refresh fraction {p.refresh_fraction:.3f})" if p else f"{m} none"
                          for m, p in cal.other.items()))
    elif other == "accuracy":
        print("the accuracy objective needs an 'answer' on every line: not compared")
    print(f"decodes: {cal.decodes_per_prompt} per prompt (1 reference + {len(cal.points)} drift metrics x at most "
          f"({len(grid)} grid points + {a.bisect_steps} bisection steps)), {cal.decodes_per_prompt * len(problems)} "
          f"in all, plus one warm-up")
    missed = [m for m, p in cal.chosen.items() if p is None]
    if missed:  # the table above says what was measured; the engine folder stays as it was
        best = ", ".join(f"{m} {max(p.score(a.objective) or 0 for p in cal.points[m]):.3f}" for m in missed)
        raise UsageError(f"no gamma meets the {a.objective} target {target:g} for drift metric "
                         f"{' and '.join(missed)} (best score: {best}); nothing recorded; lower --target")
    write_calibration(a.engines, record(cal, a.data, len(problems)))
    print(f"recorded in {Path(a.engines) / 'manifest.json'}: the default gamma of generate, eval, bench, serve and "
          f"the Python API for this engine (--gamma, or gamma in a request, still wins)", file=sys.stderr)


def cmd_serve(a) -> None:
    from .runtime.api import Engine

    try:
        from .runtime.server import MAX_QUEUE, serve
        import fastapi, uvicorn  # noqa: E401, F401
    except ImportError as e:
        raise UsageError(f"serving needs the serve extra: pip install 'dllm-trt[serve]' (missing {e.name})") from None
    if not 1 <= a.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {a.port}")
    if not 0 <= a.max_queue <= MAX_QUEUE:
        raise UsageError(f"--max-queue must be in 0..{MAX_QUEUE}, got {a.max_queue}")
    if a.max_batch is not None and not 1 <= a.max_batch <= MAX_BATCH_LIMIT:
        raise UsageError(f"--max-batch must be in 1..{MAX_BATCH_LIMIT}, got {a.max_batch}")
    if a.max_body < 1:
        raise UsageError(f"--max-body must be at least 1, got {a.max_body}")
    names = [Path(folder).name for folder in a.engines]
    if len(set(names)) < len(names):
        raise UsageError(f"--engines: the folders' names are the model names and must differ, got {names}")
    if a.ray:
        return serve_on_ray(a)
    if a.replicas is not None or a.autoscale is not None or a.ray_address is not None:
        raise UsageError("--replicas, --autoscale and --ray-address need --ray")
    engines = [Engine.load(folder, a.backend, a.threads, max_batch=a.max_batch) for folder in a.engines]
    for engine in engines:
        print(f"serving {engine.name} ({engine.backend.describe()}) on http://{a.host}:{a.port}/v1", file=sys.stderr)
        print(batching_line(engine, a.max_batch), file=sys.stderr)
    serve(engines, a.host, a.port, a.max_queue, a.max_body)


def serve_on_ray(a) -> None:
    """serve --ray: the same server on Ray Serve replicas (runtime/ray_serve.py)."""
    try:
        from .runtime.ray_serve import AppArgs, DeployFailed, ModelArgs, NotEnoughResources, serve_on_ray as run_on_ray
    except ImportError as e:
        raise UsageError(f"--ray needs the ray extra: pip install 'dllm-trt[ray]' (missing {e.name})") from None
    from pydantic import ValidationError

    from .runtime.manifest import load_manifest

    if a.replicas is not None and a.autoscale is not None:
        raise UsageError("--replicas and --autoscale exclude each other")
    autoscale = None
    if a.autoscale is not None:
        parts = a.autoscale.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"--autoscale must be MIN,MAX (two whole numbers), got {a.autoscale!r}")
        autoscale = tuple(int(p) for p in parts)
    for folder in a.engines:
        load_manifest(folder)  # a missing or broken folder fails here, in one line, before Ray starts
    try:
        given = {k: v for k, v in (("max_batch", a.max_batch), ("replicas", a.replicas)) if v is not None}
        args = AppArgs(models=[ModelArgs(engines=str(Path(folder).resolve()), backend=a.backend, threads=a.threads,
                                         autoscale=autoscale, num_cpus=a.replica_cpus, num_gpus=a.replica_gpus,
                                         **given)   # absent: ModelArgs' defaults
                               for folder in a.engines],
                       max_queue=a.max_queue, max_body=a.max_body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = next((x for x in reversed(err["loc"]) if isinstance(x, str)), "")
        flag = {"num_cpus": "--replica-cpus", "num_gpus": "--replica-gpus"}.get(field, "--" + field.replace("_", "-"))
        raise UsageError(f"{flag if field else '--ray'}: {err['msg'].removeprefix('Value error, ')}") from None
    try:
        run_on_ray(args, a.host, a.port, a.ray_address)
    except (NotEnoughResources, DeployFailed) as e:
        raise UsageError(str(e)) from None
    except ConnectionError as e:  # --ray-address names no running cluster
        raise UsageError(f"--ray-address {a.ray_address}: {str(e).splitlines()[0]}") from None


def batching_line(engine, asked: int | None) -> str:
    """What serve says at start-up about decoding requests together."""
    be = engine.backend
    if be.max_batch == 1:
        why = "" if asked in (None, 1) else f" (--max-batch {asked} ignored: the {be.name} backend's pieces take one)"
        return f"decoding one request at a time{why}"
    fit, each = engine.sequences_that_fit(), engine.sequence_bytes()
    room = ("" if fit is None else f"; the caches of {fit} requests at the longest canvas ({engine.max_positions} "
            f"positions, {each / 2**20:.1f} MiB each) fit in the memory left, more wait")
    return (f"decoding up to {engine.max_batch} requests together (--max-batch), at most {be.max_batch} per piece "
            f"call{room}")


def cmd_export(a) -> None:
    # A background job of a script starts with SIGINT ignored; an export must still stop on Ctrl-C (leaving the old
    # folder intact), from its first second on, torch's long import included.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from .export.out_folder import export_into

    if a.quant_block is not None and a.quantize is None:
        raise UsageError("--quant-block needs --quantize int8 or int4")
    export_into(a.model, Path(a.out), layers_per_range=a.layers_per_range, dtype=a.dtype, opset=a.opset,
                max_len=a.max_len, max_active=a.max_active, quantize=a.quantize, max_batch=a.max_batch,
                **({} if a.quant_block is None else {"quant_block": a.quant_block}))


def cmd_check(a) -> None:
    from .export.check import check_engines, format_table

    rows = check_engines(a.engines, a.model)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} outputs within tolerance", file=sys.stderr)
    if bad:
        sys.exit(1)


def cmd_doctor(a) -> None:
    from .runtime.doctor import gamma_line, report

    lines = report()
    if a.engines:
        from .runtime.manifest import load_manifest

        lines.append(gamma_line(a.engines, load_manifest(a.engines).calibration))
    print("\n".join(lines))


def cmd_build(a) -> None:
    from .export.tensorrt_build import build_plans

    try:
        build_plans(a.engines, a.precision, a.max_len, a.max_active, a.opt_level, flavor=a.trt_flavor,
                    target_cc=a.target_cc, max_batch=a.max_batch)
    except OSError as e:  # e.g. plans not writable there: a full disk, a read-only folder, a file too large
        raise ModelError(f"{e.filename or a.engines}: {e.strerror or e} (while building plans)") from None


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
    e.add_argument("--out", help="also save the results (with every answer) as JSON here")
    e.add_argument("--no-llada-baseline", action="store_true",
                   help="leave out the LLaDA baseline (one token per step: much the slowest to run)")
    add_decoding_args(e)
    e.set_defaults(func=cmd_eval, cache="none,dual,elastic", gen_length=128)

    bn = sub.add_parser("bench", help="speed of cache policies side by side at several gen lengths; gamma sweep")
    src = bn.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"LLaDA checkpoint directory (default: the bundled {DEFAULT_MODEL.name})")
    src.add_argument("--engines", help="exported engine directory (manifest.json)")
    bn.add_argument("--data", required=True, help="JSONL whose questions are the prompts")
    bn.add_argument("--prompts", type=int, default=None,
                    help="number of prompts (default 8; with --concurrency 4 per client of the largest load)")
    bn.add_argument("--concurrency", help="serving load instead: comma-separated numbers of client threads (e.g. "
                                          "1,4,16,64) sending the prompts, one request at a time vs batched, at the "
                                          "first --gen-lengths value")
    bn.add_argument("--max-batch", type=int, default=None,
                    help="with --concurrency: requests decoded together in the batched rows (default: the engine's)")
    bn.add_argument("--gen-lengths", default="128,256,512")
    bn.add_argument("--repeats", type=int, default=3)
    bn.add_argument("--gamma-sweep", help="comma-separated gammas for an accuracy-vs-speed sweep")
    bn.add_argument("--sweep-limit", type=int, default=100, help="problems in the sweep (default 100)")
    bn.add_argument("--sweep-gen-length", type=int, default=128)
    bn.add_argument("--plot", help="PNG path for the sweep plot (needs matplotlib)")
    bn.add_argument("--no-llada-baseline", action="store_true",
                    help="leave out the LLaDA baseline (one token per step: much the slowest to run)")
    bn.add_argument("--out", help="also save the results as JSON here")
    add_decoding_args(bn)
    bn.set_defaults(func=cmd_bench, cache="none,dual,elastic")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server over exported engines")
    sv.add_argument("--engines", required=True, nargs="+", metavar="DIR",
                    help="exported engine directory (manifest.json); several: one endpoint, the request's 'model' "
                         "(the folder's name) picks one")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt")
    add_threads_arg(sv)
    sv.add_argument("--max-batch", type=int, default=None,
                    help="requests decoded together (continuous batching; default 32, fewer where their caches do not "
                         "fit in memory; pieces are called for at most the export's --max-batch at once; 1: one at a "
                         "time)")
    sv.add_argument("--max-queue", type=int, default=16,
                    help="requests that may wait while --max-batch decode, before 503 (default 16)")
    sv.add_argument("--max-body", type=int, default=1 << 20,
                    help="largest request body in bytes; larger ones get 413 before being read (default 1 MiB)")
    ray = sv.add_argument_group("Ray Serve (docs/SCALING.md; needs the ray extra)")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas instead of this process")
    ray.add_argument("--replicas", type=int, help="replicas per engine folder (default 1)")
    ray.add_argument("--autoscale", metavar="MIN,MAX", help="scale replicas between MIN and MAX with the load")
    ray.add_argument("--ray-address", help="join this Ray cluster ('auto': the one started on this node with "
                                           "ray start); default: start a local Ray instance")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1; also its "
                                                                      "ONNX Runtime threads unless --threads)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each replica reserves (default 0)")
    sv.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="export a checkpoint as ONNX pieces + manifest.json")
    x.add_argument("--model", required=True, help="LLaDA checkpoint directory")
    x.add_argument("--out", required=True, help="output directory, e.g. engines/NAME")
    x.add_argument("--layers-per-range", type=int, default=1)
    x.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 for ONNX Runtime on CPU; bf16/fp16 for TensorRT")
    x.add_argument("--opset", type=int, default=20, choices=[20, 23])
    x.add_argument("--max-len", type=int, help="largest canvas (prompt + gen length); default: the model's maximum")
    x.add_argument("--max-active", type=int, help="largest number of query rows in a window pass (default 256, or "
                                                   "--max-len when smaller)")
    x.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"most sequences one piece call may "
                   f"take (the batch axis of every piece; default {DEFAULT_MAX_BATCH})")
    x.add_argument("--quantize", choices=["int8", "int4"], help="weight-only block quantization of the layer and head "
                   "matmuls (ONNX Runtime MatMulNBits; int4 also the embedding table; CPU); default: float weights")
    x.add_argument("--quant-block", type=int, help="weights per quantization block: 16, 32, 64, 128 (default) or 256")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("check", help="compare every exported piece with the PyTorch reference")
    c.add_argument("engines", help="exported engine directory")
    c.add_argument("--model", help="source checkpoint (default: the one recorded in manifest.json)")
    c.set_defaults(func=cmd_check)

    bld = sub.add_parser("build", help="build TensorRT plans for this GPU (once; a no-op when up to date)")
    bld.add_argument("engines", help="exported engine directory (export with --dtype bf16 or fp16 for speed)")
    bld.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: the export's dtype")
    bld.add_argument("--trt-flavor", default="auto", choices=["auto", "tensorrt", "rtx"],
                     help="auto (what is installed) | tensorrt | rtx (TensorRT for RTX)")
    bld.add_argument("--target-cc", help="TensorRT for RTX: compute capabilities to build for, e.g. 8.6,8.9, "
                     "'current' or 'ampere+' (default: this GPU; without one, ampere+ = sm80..sm121)")
    bld.add_argument("--max-len", type=int, help="largest canvas (default: the export's)")
    bld.add_argument("--max-active", type=int, help="largest window pass (default: the export's)")
    bld.add_argument("--max-batch", type=int, help="most sequences per call the plans take (default: the export's "
                     "--max-batch; fewer make smaller activation workspaces)")
    bld.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5")
    bld.set_defaults(func=cmd_build)

    d = sub.add_parser("doctor", help="what this machine has and which backends are usable")
    d.add_argument("engines", nargs="?", help="also say where this engine folder's default gamma comes from")
    d.set_defaults(func=cmd_doctor)

    cal = sub.add_parser("calibrate", help="pick an engine's drift threshold gamma on your prompts (recorded in "
                                           "its manifest.json as the default gamma)")
    cal.add_argument("engines", help="exported engine directory (manifest.json); the result is recorded there")
    cal.add_argument("--data", required=True, help="JSONL with a 'question' per line ('answer' too for accuracy)")
    cal.add_argument("--prompts", type=int, default=64, help="first N lines (default 64)")
    cal.add_argument("--objective", default="agreement", choices=["agreement", "accuracy"],
                     help="agreement: answers equal to the same schedule without cache (default); accuracy: exact "
                          "match, as eval scores it")
    cal.add_argument("--target", type=float, help="agreement: fraction of prompts (default 0.99); accuracy: points "
                                                  "below the best gamma found (default 1)")
    cal.add_argument("--grid", default=",".join(f"{g:g}" for g in GRID), help="coarse gammas (default %(default)s)")
    cal.add_argument("--bisect-steps", type=int, default=BISECT_STEPS, help="bisections of the cliff (default "
                                                                             "%(default)s)")
    cal.add_argument("--gen-length", type=int, help="positions to generate (default: the checkpoint's max_new_tokens, "
                                                    f"else {DEFAULT_GEN_LENGTH})")
    cal.add_argument("--window", type=int, help="sliding window (default 16)")
    cal.add_argument("--threshold", type=float, help="unmask confidence threshold (default 0.9)")
    cal.add_argument("--track-num", type=int, default=1)
    cal.add_argument("--refresh-alignment", default="rerun", choices=["rerun", "next"])
    cal.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt")
    add_threads_arg(cal)
    cal.set_defaults(func=cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> bool:
    """Run one command. True when the process may now end without tearing anything down (see run)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) is None and getattr(args, "engines", None) is None:
        args.model = str(DEFAULT_MODEL)
    try:
        check_threads(args)
        return bool(args.func(args))
    except (UsageError, ModelError, BackendError, OutputError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        raise  # run() leaves quietly
    except OSError as e:  # the file system's answer (a name too long, a loop of links, ...): not a bug of ours
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")


def run() -> None:
    """The `dllm-trt` console script. A finished one-shot `generate` on ONNX Runtime leaves with os._exit: its
    output is flushed and it has nothing left to save, while tearing down its sessions and the interpreter takes
    about 30 ms of the bundled model's 0.29 s run (docs/BENCHMARKS.md section 12)."""
    try:
        fast = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (| head): nothing left to say, and no traceback about it
        os._exit(1)
    if fast:
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    run()
