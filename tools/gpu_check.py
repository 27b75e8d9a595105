"""GPU checks in one run of at most ~8 minutes (for a lent GPU machine; see tools/gpu_check.sh). Needs only PyTorch:

(a) token-identical generation, torch backend on CUDA fp32 vs the CPU reference, every policy: eager, CUDA graphs
    (reference attention), CUDA graphs + fast attention (fused QKV, scaled_dot_product_attention);
(b) LLaDA-8B shape with random weights, bf16, canvases 512 and 1024: window step (all 32 ranges), refresh step and
    Fast-dLLM dual-cache block step, eager and with CUDA graphs, each against the weight-read floor (measured copy
    bandwidth) and the bf16 matmul floor (measured TFLOP/s of a large matmul);
(c) the bundled model (models/arith): eval on 200 held-out problems with every baseline, torch backend on the GPU;
(d) a projection of LLaDA-8B GSM8K-256 tokens/s from (b) and published tokens/step and refresh fractions
    (docs/GPU.md explains the arithmetic);
(e) the TensorRT GPU tests, when a TensorRT flavour is installed;
(f) the ONNX Runtime CUDA-provider test (caches on the device), when onnxruntime-gpu is installed (last: skipped
    when time runs out);
(g) (run before (e) and (f)) several sequences decoded together: aggregate positions/s at batch 1, 8 and 32,
    LLaDA-8B shape, random weights, torch backend running each piece once per step for the whole batch.

Every section reports its own failure and the report is rewritten after each one. `--device cpu --quick` runs the
same code on small shapes (tests/test_cuda_graphs.py), to catch crashes before a GPU session.

    python3 tools/gpu_check.py [OUT.md] [--device cuda|cpu] [--quick] [--budget SECONDS]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pieces import refresh_step, step_inputs, window_step  # noqa: E402

LLADA_8B = dict(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, mask_token_id=126336, eos_token_id=126081, max_sequence_length=4096,
                rms_norm_eps=1e-5, rope_theta=500000.0)
SMALL = dict(d_model=128, n_heads=4, n_layers=4, mlp_hidden_size=256, vocab_size=512, embedding_size=512,
             mask_token_id=500, eos_token_id=501, max_sequence_length=256, rms_norm_eps=1e-5, rope_theta=10000.0)

# Published decoding statistics for LLaDA-8B-Instruct, GSM8K 5-shot, gen length 256 (../shared/research): the
# Polestar re-measurement (A100-80GB, batch 1) and Elastic-Cache's reported refresh fraction at gamma 0.9.
PUBLISHED = {"elastic_tpf": 2.93, "elastic_tps_a100": 55.01, "fastdllm_tpf": 2.72, "fastdllm_tps_a100": 47.88,
             "refresh_fraction": 0.10, "block": 32, "gen": 256}


class Check:
    """Run state shared by the sections: device, size, deadline, the report lines and measured numbers."""

    def __init__(self, out: Path, device: str, quick: bool, budget: float):
        self.out, self.device, self.quick = out, device, quick
        self.deadline = time.perf_counter() + budget
        self.lines: list[str] = []
        self.measured: dict = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def timed(self, fn):
        """(seconds, fn()) with the device synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        value = fn()
        self.sync()
        return time.perf_counter() - t0, value

    def free_device_cache(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def write(self) -> None:
        self.out.write_text("\n".join(self.lines) + "\n")


# ---- (a) parity ------------------------------------------------------------------------------------------------
POLICIES = {"none": dict(cache="none", window=8, threshold=0.08), "prefix": dict(cache="prefix", threshold=0.08),
            "dual": dict(cache="dual", threshold=0.08),
            "elastic (rerun)": dict(cache="elastic", window=8, threshold=0.08, gamma=0.95),
            "elastic (next)": dict(cache="elastic", window=8, threshold=0.08, gamma=0.95, refresh_alignment="next")}


def generate(backend, options: dict, prompt, gen: int = 32):
    from dllm_trt.runtime.decoder import Decoder
    from dllm_trt.runtime.options import DecodeOptions, build

    schedule, policy = build(DecodeOptions(**options), gen)
    return Decoder(backend, policy, schedule).generate(prompt)


def parity(ck: Check) -> None:
    from dllm_trt.runtime.backends.torch_backend import PaddedTorchBackend, TorchBackend

    model = REPO / "models" / "tiny"
    cpu = TorchBackend(model, 2, "cpu", "fp32")
    variants = {"eager": TorchBackend(model, 2, ck.device, "fp32"),
                "graphs": PaddedTorchBackend(model, 2, ck.device, "fp32", graphs=True, fast=False),
                "graphs + fast attention": PaddedTorchBackend(model, 2, ck.device, "fp32", graphs=True, fast=True)}
    rng = np.random.default_rng(7)
    prompts = [rng.integers(32, 127, int(rng.integers(4, 20))).tolist() for _ in range(1 if ck.quick else 10)]
    ck.lines += [f"\n## (a) torch backend on {ck.device} vs the CPU reference (tiny model, fp32, {len(prompts)} "
                 "prompts, gen 32): identical generations\n",
                 "| policy | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name, options in POLICIES.items():
        want = [generate(cpu, options, p).canvas_ids for p in prompts]
        same = [sum(generate(be, options, p).canvas_ids == w for p, w in zip(prompts, want))
                for be in variants.values()]
        ck.lines.append(f"| {name} | " + " | ".join(f"{s}/{len(prompts)}" for s in same) + " |")
    g = variants["graphs"]
    ck.lines.append(f"\ngraphs: {g.captures} CUDA graphs captured, {len(g.programs)} fixed-shape programs "
                    f"({sum(p.runs for p in g.programs.values())} runs)")


# ---- (b) LLaDA-8B-shape timings ----------------------------------------------------------------------------------
def measure_floors(ck: Check, dtype) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, matmul FLOP/s) measured on this device."""
    import torch

    def rate(fn, reps):
        fn()
        return ck.timed(lambda: [fn() for _ in range(reps)])[0] / reps

    size = (64 << 20) if ck.quick else (2 << 30)
    x = torch.empty(size, dtype=torch.uint8, device=ck.device)
    y = torch.empty_like(x)
    bandwidth = 2 * size / rate(lambda: y.copy_(x), 10)
    del x, y
    m = 512 if ck.quick else 8192
    a = torch.randn(m, m, dtype=dtype, device=ck.device)
    b = torch.randn(m, m, dtype=dtype, device=ck.device)
    flops = 2 * m ** 3 / rate(lambda: a @ b, 5 if ck.quick else 20)
    return bandwidth, flops


def step_cost(cfg, n: int, rows: int, window: int, layer_params: int) -> tuple[int, int]:
    """(weight bytes read, matmul FLOPs) of a step computing `rows` query rows against n keys in every layer,
    plus the head on `window` rows (bf16 weights)."""
    head = cfg.vocab_size * cfg.d_model
    weights = 2 * (cfg.n_layers * layer_params + head)
    flops = 2 * rows * cfg.n_layers * layer_params + 4 * rows * n * cfg.d_model * cfg.n_layers + 2 * window * head
    return weights, flops


def timings(ck: Check) -> None:
    import torch

    from dllm_trt.runtime.backends.torch_backend import PaddedTorchBackend, TorchBackend
    from dllm_trt.runtime.config import ModelConfig

    cfg = ModelConfig(**(SMALL if ck.quick else LLADA_8B))
    dtype_name = "fp32" if ck.device == "cpu" else "bf16"
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    gen, window, tracked, block = (32, 8, 4, 8) if ck.quick else (256, 16, 12, 32)
    canvases = [64] if ck.quick else [512, 1024]
    repeats = 2 if ck.quick else 10
    bandwidth, matmul = measure_floors(ck, dtype)
    ck.lines += [f"\n## (b) {'small' if ck.quick else 'LLaDA-8B'} shape, random weights, {dtype_name}, torch backend "
                 f"on {ck.device}\n",
                 f"measured: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write), {dtype_name} matmul "
                 f"{matmul / 1e12:.1f} TFLOP/s. Floors per step: weights read once at that bandwidth; the step's "
                 "matmul FLOPs at that rate.\n",
                 "| canvas | step | rows | mode | median ms | x weight-read floor | x matmul floor |",
                 "|---|---|---|---|---|---|---|"]
    ck.write()
    for mode, backend_class, options in (("eager", TorchBackend, {}),
                                         ("graphs", PaddedTorchBackend, dict(graphs=True, fast=True))):
        be = backend_class.random(cfg, 1, ck.device, dtype_name, **options)
        layer_params = sum(p.numel() for p in be.layers[0].parameters())
        for n in canvases:
            prompt = n - gen
            ids, mask, targets, queries, track = step_inputs(cfg, n, prompt, window, tracked)
            block_rows = np.arange(prompt, prompt + block)
            steps = {"window": (lambda: window_step(be, ids, mask, targets, queries, track), len(queries), window),
                     "refresh": (lambda: refresh_step(be, ids, mask, targets), n, window),
                     "dual block": (lambda: window_step(be, ids, mask, block_rows, block_rows, block_rows[:0]),
                                    block, block)}
            be.begin(n)
            refresh_step(be, ids, mask, targets)
            for name, (fn, rows, heads) in steps.items():
                if ck.left() < 60:
                    ck.lines.append(f"| {n} | {name} | {rows} | {mode} | skipped: time budget | | |")
                    continue
                fn()  # first call: programs built / graphs captured
                t = statistics.median(ck.timed(fn)[0] for _ in range(repeats))
                weights, flops = step_cost(cfg, n, rows, heads, layer_params)
                floor_w, floor_f = weights / (bandwidth / 2), flops / matmul  # copy bandwidth counts 2 bytes/byte
                ck.measured[(n, name, mode)] = t
                ck.lines.append(f"| {n} | {name} | {rows} | {mode} | {t * 1e3:.2f} | {t / floor_w:.1f}x | "
                                f"{t / floor_f:.1f}x |")
                ck.write()
        del be
        ck.free_device_cache()
    ck.measured["canvas"] = canvases[-1]


# ---- (c) the bundled model ---------------------------------------------------------------------------------------
def arith_eval(ck: Check) -> None:
    from dllm_trt.evaluate.harness import evaluate, load_problems, standard_configs, table
    from dllm_trt.runtime.backends.torch_backend import torch_backend
    from dllm_trt.runtime.tokenizer import TextTokenizer

    model = REPO / "models" / "arith"
    limit, gen = (2, 16) if ck.quick else (200, 128)
    problems = load_problems(str(REPO / "data" / "arith_heldout.jsonl"), limit)
    tok = TextTokenizer(model)
    runs = [("CUDA graphs + fast attention", dict(graphs=True), True), ("eager", {}, False)]
    for label, options, llada in runs[:1] if ck.quick else runs:
        if ck.left() < 90:
            ck.lines.append(f"\n(c) {label}: skipped, time budget")
            continue
        backend = torch_backend(model, 1, ck.device, "fp32", **options)
        configs = standard_configs(["elastic"], llada_baseline=llada)
        summaries = evaluate(backend, tok, problems, configs, gen, progress=False)
        ck.lines += ["", table(summaries, f"## (c) models/arith, {len(problems)} held-out problems, gen {gen}, "
                                          f"{backend.describe()}")]
        ck.write()


# ---- (d) projection ----------------------------------------------------------------------------------------------
def project(measured: dict, published: dict = PUBLISHED) -> dict:
    """LLaDA-8B GSM8K-256 tokens/s from measured step times (docs/GPU.md, "Projection"). Returns per mode the
    projected tokens/s of Elastic-Cache and Fast-dLLM."""
    n, out = measured["canvas"], {}
    for mode in ("eager", "graphs"):
        try:
            window, refresh, blk = (measured[(n, s, mode)] for s in ("window", "refresh", "dual block"))
        except KeyError:
            continue
        elastic_step = window + published["refresh_fraction"] * refresh
        steps_per_block = published["block"] / published["fastdllm_tpf"]
        fast_step = blk + refresh / steps_per_block  # Fast-dLLM refreshes the dual cache once per block
        out[mode] = {"elastic_step_ms": elastic_step * 1e3, "elastic_tps": published["elastic_tpf"] / elastic_step,
                     "fastdllm_step_ms": fast_step * 1e3, "fastdllm_tps": published["fastdllm_tpf"] / fast_step}
    return out


def projection(ck: Check) -> None:
    if "canvas" not in ck.measured:
        raise RuntimeError("no step times from (b) to project from")
    rows = project(ck.measured)
    p = PUBLISHED
    ck.lines += [f"\n## (d) projected LLaDA-8B GSM8K-256 tokens/s (canvas {ck.measured['canvas']}, published "
                 f"TPF {p['elastic_tpf']} Elastic-Cache / {p['fastdllm_tpf']} Fast-dLLM, refresh fraction "
                 f"{p['refresh_fraction']}; see docs/GPU.md)\n",
                 "| mode | Elastic-Cache ms/step | Elastic-Cache tok/s | Fast-dLLM ms/step | Fast-dLLM tok/s |",
                 "|---|---|---|---|---|"]
    for mode, r in rows.items():
        ck.lines.append(f"| {mode} | {r['elastic_step_ms']:.2f} | {r['elastic_tps']:.1f} | "
                        f"{r['fastdllm_step_ms']:.2f} | {r['fastdllm_tps']:.1f} |")
    ck.lines.append(f"\npublished on one A100-80GB (Polestar re-measurement): Elastic-Cache {p['elastic_tps_a100']} "
                    f"tok/s, Fast-dLLM {p['fastdllm_tps_a100']} tok/s")


# ---- (e) TensorRT ------------------------------------------------------------------------------------------------
def tensorrt_tests(ck: Check) -> None:
    """Run the TensorRT GPU tests of each installed flavour that supports this GPU (pytest, in a subprocess)."""
    import subprocess

    import torch

    from dllm_trt.runtime.backends.tensorrt_backend import installed_flavors
    from dllm_trt.runtime.trt_plans import FLAVOR_NAMES, gpu_support

    ck.lines.append("\n## (e) TensorRT on this GPU\n")
    if not installed_flavors() or not ck.device.startswith("cuda"):
        ck.lines.append("no TensorRT flavour installed (or no GPU): nothing to run")
        return
    major, minor = torch.cuda.get_device_capability()
    tests = {"rtx": ["tests/test_tensorrt_rtx.py"],
             "tensorrt": ["tests/test_tensorrt_logic.py::test_tensorrt_build_and_generate"]}
    for flavor in installed_flavors():
        ok, advice = gpu_support(flavor, f"{major}.{minor}")
        if not ok:
            ck.lines.append(f"{FLAVOR_NAMES[flavor]}: skipped ({advice})")
            continue
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *tests[flavor]], cwd=REPO,
                             capture_output=True, text=True, timeout=max(ck.left(), 1))
        tail = "\n".join(run.stdout.strip().splitlines()[-15:])
        ck.lines.append(f"{FLAVOR_NAMES[flavor]}: pytest exit {run.returncode}\n\n```\n{tail}\n```")


# ---- (f) ONNX Runtime's CUDA execution provider -----------------------------------------------------------------
def onnxruntime_cuda_tests(ck: Check) -> None:
    """The CUDA-provider test (device caches, every policy, CUDA vs CPU tokens) where onnxruntime-gpu is installed."""
    import subprocess

    ck.lines.append("\n## (f) ONNX Runtime, CUDA execution provider\n")
    try:
        import onnxruntime
    except ImportError:
        ck.lines.append("onnxruntime is not installed: nothing to run")
        return
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() or not ck.device.startswith("cuda"):
        ck.lines.append("no CUDA execution provider (onnxruntime-gpu) here: nothing to run")
        return
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs",
                          "tests/test_ort_device_caches.py::test_cuda_device_caches_decode_like_the_cpu"], cwd=REPO,
                         capture_output=True, text=True, timeout=max(ck.left(), 1))
    tail = "\n".join(run.stdout.strip().splitlines()[-15:])
    verdict = "passed" if run.returncode == 0 else "failed"
    ck.lines.append(f"pytest exit {run.returncode} ({verdict})\n\n```\n{tail}\n```")


# ---- (g) several requests decoded together ------------------------------------------------------------------------
BATCHES = (1, 8, 32)


def batched_decoding(ck: Check) -> None:
    """Aggregate decoding speed of B sequences stepped together (Decoder.step; the torch backend runs each piece
    once for all of them, eagerly: no CUDA graphs for batches yet), LLaDA-8B shape, random weights. Random weights
    give no meaningful confidences or drift, so the schedules are fixed: 3 tokens per step (about the published
    tokens/step), Elastic-Cache with gamma -1 (a full pass at each sequence's first step, window steps after) and
    Fast-dLLM's dual cache (a full pass at each block start, block steps after); positions decoded, not tokens up to
    an end token."""
    from dllm_trt.runtime.backends.torch_backend import TorchBackend
    from dllm_trt.runtime.config import ModelConfig
    from dllm_trt.runtime.decoder import Decoder
    from dllm_trt.runtime.options import DecodeOptions, build

    cfg = ModelConfig(**(SMALL if ck.quick else LLADA_8B))
    dtype_name = "fp32" if ck.device == "cpu" else "bf16"
    prompt_len, gen, block = (24, 24, 8) if ck.quick else (256, 128, 32)
    batches = (1, 2, 4) if ck.quick else BATCHES
    configs = {"elastic, window 16": DecodeOptions(cache="elastic", window=16, threshold=None, tokens_per_step=3,
                                                   gamma=-1.0, early_stop=False),
               "dual cache, block 32": DecodeOptions(cache="dual", block_length=block, steps=gen // 3 // (gen // block)
                                                     * (gen // block), early_stop=False)}
    be = TorchBackend.random(cfg, 1, ck.device, dtype_name, max_batch=max(batches))
    ck.lines += [f"\n## (g) batched decoding, {'small' if ck.quick else 'LLaDA-8B'} shape, random weights, "
                 f"{dtype_name}, torch backend (eager) on {ck.device}\n",
                 f"B sequences (prompt {prompt_len}, {gen} positions each) decoded together, one piece call per step "
                 f"for all of them; positions decoded per second, all sequences together.\n",
                 "| schedule | batch | steps | seconds | positions/s | vs batch 1 | ms per step |", "|---|---|---|---|---|---|---|"]
    ck.write()
    rng = np.random.default_rng(0)
    for label, opts in configs.items():
        base = None
        for b in batches:
            if ck.left() < 90:
                ck.lines.append(f"| {label} | {b} | skipped: time budget | | | | |")
                continue
            decoder = Decoder(be)

            def run():
                seqs = []
                for _ in range(b):
                    schedule, policy = build(opts, gen)
                    seqs.append(decoder.start(rng.integers(0, cfg.mask_token_id, prompt_len).tolist(), schedule,
                                              policy))
                steps = 0
                while not all(s.done for s in seqs):
                    decoder.step([s for s in seqs if not s.done])
                    steps += 1
                for s in seqs:
                    decoder.finish(s)
                return steps

            run()  # warm-up: allocator, kernels
            seconds, steps = ck.timed(run)
            rate = b * gen / seconds
            base = base or rate
            ck.measured[("batched", label, b)] = rate
            ck.lines.append(f"| {label} | {b} | {steps} | {seconds:.2f} | {rate:.0f} | {rate / base:.2f}x | "
                            f"{seconds / steps * 1e3:.1f} |")
            ck.write()
    del be
    ck.free_device_cache()


SECTIONS = (parity, timings, arith_eval, projection, batched_decoding, tensorrt_tests, onnxruntime_cuda_tests)


def main(argv: list[str] | None = None) -> Check:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="gpu_check.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes and few problems (for CPU smoke tests)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    a = ap.parse_args(argv)
    import torch

    torch.set_grad_enabled(False)
    ck = Check(Path(a.out), a.device, a.quick, a.budget)
    ck.lines = ["# GPU check", ""]
    try:
        from dllm_trt.runtime.doctor import report

        ck.lines += ["```", *report(), "```"]
    except Exception as e:
        ck.lines.append(f"doctor failed: {type(e).__name__}: {e}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ck.lines.append("\nno CUDA device: nothing else to check")
        ck.write()
        return ck
    for section in SECTIONS:
        t0 = time.perf_counter()
        try:
            section(ck)
        except Exception as e:  # report and go on: one failing section must not lose the others
            tail = "".join(traceback.format_exception(e)[-3:])
            ck.lines.append(f"\n{section.__name__} failed: {type(e).__name__}: {e}\n\n```\n{tail}```")
        ck.lines.append(f"\n({section.__name__}: {time.perf_counter() - t0:.0f} s)")
        ck.write()
    print("\n".join(ck.lines))
    return ck


if __name__ == "__main__":
    main()
