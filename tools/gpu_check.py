"""GPU checks in one run (for a lent GPU machine; see tools/gpu_check.sh):

1. doctor, and whether TensorRT imports; when the installed flavour (TensorRT or TensorRT for RTX) supports this
   GPU, its GPU tests (plans built, loaded and decoding token for token like ONNX Runtime);
2. the torch backend on CUDA against the CPU reference on the bundled tiny model: token-identical generation for
   every cache policy in fp32, and bf16 agreement on a full forward;
3. timings of an LLaDA-8B-shaped model with random weights (32 layers, d_model 4096, bf16, prompt 256 + gen 256):
   window-pass and refresh-pass latency per layer range, against the floor of reading the range's weights once at
   the measured device copy bandwidth.

Writes a markdown report to the path given (default gpu_check.md).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pieces import refresh_step, step_inputs, window_step  # noqa: E402


def parity(lines: list[str], device: str = "cuda") -> None:
    from dllm_trt.runtime.backends.torch_backend import TorchBackend
    from dllm_trt.runtime.decoder import Decoder
    from dllm_trt.runtime.policies import make_policy
    from dllm_trt.runtime.schedule import BlockSchedule, WindowSchedule

    model = REPO / "models" / "tiny"
    cpu = TorchBackend(model, 2, "cpu", "fp32")
    gpu = TorchBackend(model, 2, device, "fp32")
    schedules = {"none": lambda: BlockSchedule(32, 16, steps=32), "prefix": lambda: BlockSchedule(32, 16, threshold=0.08),
                 "dual": lambda: BlockSchedule(32, 16, threshold=0.08),
                 "elastic": lambda: WindowSchedule(32, 8, threshold=0.08)}
    rng = np.random.default_rng(7)
    prompts = [rng.integers(32, 127, int(rng.integers(4, 20))).tolist() for _ in range(10)]
    lines.append("\n## CUDA backend vs CPU reference (tiny model, fp32, 10 prompts)\n")
    lines.append("| policy | identical generations |")
    lines.append("|---|---|")
    for name, sched in schedules.items():
        same = sum(Decoder(cpu, make_policy(name), sched()).generate(p).canvas_ids ==
                   Decoder(gpu, make_policy(name), sched()).generate(p).canvas_ids for p in prompts)
        lines.append(f"| {name} | {same}/{len(prompts)} |")
    bf16 = TorchBackend(model, 2, device, "bf16")
    agree, diffs = 0, []
    for p in prompts:
        ids = np.array(p + [cpu.config.mask_token_id] * 16)
        rows = np.arange(len(p), len(ids))
        out = []
        for b in (cpu, bf16):
            b.begin(len(ids))
            b.embed(ids)
            for r in range(len(b.ranges)):
                b.refresh(r, rows, ids == cpu.config.mask_token_id)
            out.append(b.head(rows))
        agree += int(np.sum(out[0][0] == out[1][0]))
        diffs.append(float(np.max(np.abs(out[0][1] - out[1][1]))))
    lines.append(f"\nbf16 on CUDA vs fp32 on CPU, one full forward: {agree}/{16 * len(prompts)} argmax tokens agree, "
                 f"max |prob difference| {max(diffs):.3e}")


LLADA_8B = dict(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, mask_token_id=126336, eos_token_id=126081, max_sequence_length=4096,
                rms_norm_eps=1e-5, rope_theta=500000.0)


def timings(lines: list[str], repeats: int = 10, shape: dict = LLADA_8B, device: str = "cuda",
            copy_bytes: int = 2 << 30) -> None:
    import torch

    from dllm_trt.runtime.backends.torch_backend import TorchBackend
    from dllm_trt.runtime.config import ModelConfig

    cfg = ModelConfig(**shape)
    prompt, gen, window, tracked = 256, 256, 16, 12
    n = prompt + gen
    be = TorchBackend.random(cfg, 1, device, "bf16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    bandwidth = 10 * 2 * x.numel() / (time.perf_counter() - t0)  # bytes read + written per second
    del x, y
    layer_bytes = sum(p.numel() * p.element_size() for p in be.layers[0].parameters())

    ids, mask, targets, queries, track = step_inputs(cfg, n, prompt, window, tracked)

    def timed(fn):
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    be.begin(n)
    refresh_step(be, ids, mask, targets)
    refresh_layer = timed(lambda: be.refresh(len(be.ranges) // 2, targets, mask))
    be.embed(ids[queries], queries)
    window_layer = timed(lambda: (be.embed(ids[queries], queries), be.window(0, queries, track, targets, mask)))
    step_refresh = timed(lambda: refresh_step(be, ids, mask, targets))
    step_window = timed(lambda: window_step(be, ids, mask, targets, queries, track))
    floor_layer = layer_bytes / bandwidth
    lines.append(f"\n## LLaDA-8B shape, random weights, bf16, torch backend on CUDA "
                 f"(canvas {n} = prompt {prompt} + gen {gen}; window pass = {len(queries)} query rows)\n")
    lines.append(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); one layer's weights "
                 f"{layer_bytes / 2**20:.0f} MiB -> weight-read floor {floor_layer * 1e3:.3f} ms per layer, "
                 f"{cfg.n_layers * floor_layer * 1e3:.2f} ms for {cfg.n_layers} layers\n")
    lines.append("| measurement | median ms | multiple of weight-read floor |")
    lines.append("|---|---|---|")
    for name, t, floor in (("refresh pass, one layer range (1 layer, all 512 rows)", refresh_layer, floor_layer),
                           ("window pass, one layer range (1 layer, query rows only; incl. embed)", window_layer,
                            floor_layer),
                           ("full refresh step (embed + all ranges + head)", step_refresh, cfg.n_layers * floor_layer),
                           ("full window step (embed + all ranges + head)", step_window, cfg.n_layers * floor_layer)):
        lines.append(f"| {name} | {t * 1e3:.2f} | {t / floor:.1f}x |")


def tensorrt_tests(lines: list[str]) -> None:
    """Run the TensorRT GPU tests of each installed flavour that supports this GPU (pytest, in a subprocess)."""
    import subprocess

    import torch

    from dllm_trt.runtime.backends.tensorrt_backend import installed_flavors
    from dllm_trt.runtime.trt_plans import FLAVOR_NAMES, gpu_support

    major, minor = torch.cuda.get_device_capability()
    tests = {"rtx": ["tests/test_tensorrt_rtx.py"],
             "tensorrt": ["tests/test_tensorrt_logic.py::test_tensorrt_build_and_generate"]}
    lines.append("\n## TensorRT on this GPU\n")
    if not installed_flavors():
        lines.append("no TensorRT flavour installed: nothing to run")
    for flavor in installed_flavors():
        ok, advice = gpu_support(flavor, f"{major}.{minor}")
        if not ok:
            lines.append(f"{FLAVOR_NAMES[flavor]}: skipped ({advice})")
            continue
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *tests[flavor]], cwd=REPO,
                             capture_output=True, text=True)
        tail = "\n".join(run.stdout.strip().splitlines()[-15:])
        lines.append(f"{FLAVOR_NAMES[flavor]}: pytest exit {run.returncode}\n\n```\n{tail}\n```")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check.md")
    import torch

    from dllm_trt.runtime.doctor import report

    lines = ["# GPU check", "", "```", *report(), "```"]
    try:
        import tensorrt  # noqa: F401

        lines.append("\nTensorRT imports: yes")
    except ImportError as e:
        lines.append(f"\nTensorRT imports: no ({e})")
    if not torch.cuda.is_available():
        lines.append("\nno CUDA device: nothing else to check")
    else:
        for section in (tensorrt_tests, parity, timings):
            try:
                section(lines)
            except Exception as e:  # report and go on: one failing section must not lose the others
                lines.append(f"\n{section.__name__} failed: {type(e).__name__}: {e}")
            out.write_text("\n".join(lines) + "\n")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
