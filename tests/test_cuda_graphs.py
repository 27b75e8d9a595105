"""CUDA graphs on the torch backend. On CPU: the bookkeeping (which bucket a step uses, static buffers reused, one
program per shape) and that the graph path's eager fallback decodes token for token like the plain backend. With
CUDA: captured graphs replayed, token-identical to the CPU reference."""
import numpy as np
import pytest
import torch

from dllm_trt.runtime import buckets as bk
from dllm_trt.runtime.backends.torch_backend import PaddedTorchBackend, TorchBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DecodeOptions, build

GEN = 32
ELASTIC = DecodeOptions(cache="elastic", window=8, threshold=0.08, gamma=0.995)
CASES = [DecodeOptions(cache="none", window=8, threshold=0.08), DecodeOptions(cache="dual", threshold=0.08),
         DecodeOptions(cache="prefix", threshold=0.08), ELASTIC,
         DecodeOptions(cache="elastic", window=8, threshold=0.08, gamma=0.9, refresh_alignment="next")]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def generate(backend, opts, prompt, on_step=None):
    schedule, policy = build(opts, GEN)
    return Decoder(backend, policy, schedule).generate(prompt, on_step=on_step)


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return TorchBackend(tiny_dir, 1, "cpu")


def test_graph_flag_on_cpu_runs_the_same_programs_eagerly(tiny_dir, plain, prompts):
    graphed = PaddedTorchBackend(tiny_dir, 1, "cpu", graphs=True, fast=False)
    assert not graphed.graphs and graphed.one_sync_per_step
    for opts in CASES:
        for prompt in prompts[:2]:
            a, b = generate(plain, opts, prompt), generate(graphed, opts, prompt)
            assert (a.canvas_ids, a.steps, a.layer_steps_refreshed) == (b.canvas_ids, b.steps, b.layer_steps_refreshed)
    assert graphed.captures == 0


def test_fast_attention_path_decodes_like_the_reference(tiny_dir, plain, prompts):
    fast = PaddedTorchBackend(tiny_dir, 1, "cpu", graphs=True)
    assert fast.fast and all(lr.fast for lr in fast.layers)
    for prompt in prompts[:3]:
        a, b = generate(plain, ELASTIC, prompt), generate(fast, ELASTIC, prompt)
        assert a.canvas_ids == b.canvas_ids


def test_each_step_uses_its_bucket_and_reuses_static_buffers(tiny_dir, prompts):
    be = PaddedTorchBackend(tiny_dir, 1, "cpu")
    prompt = prompts[0]
    shapes = []

    def record(canvas):
        shapes.append(be.last_shape)
        be.last_shape = None  # a step that runs no window program (a full refresh) leaves it None

    generate(be, ELASTIC, prompt, on_step=record)
    n = len(prompt) + GEN
    window_shapes = {s for s in shapes if s is not None}
    assert window_shapes, "no window step ran"
    for s in window_shapes:
        assert s.canvas == n and s.queries in be.sizes and s.window == bk.bucket_for(8, be.sizes)
    programs = dict(be.programs)
    buffers = {key: prog.device_in.data_ptr() for key, prog in programs.items()}
    runs = {key: prog.runs for key, prog in programs.items()}
    cache_ptrs = [x.data_ptr() for x in be.k]
    generate(be, ELASTIC, prompt)  # the same canvas length: the same programs, buffers and caches again
    assert set(be.programs) == set(programs)
    assert all(be.programs[key] is programs[key] for key in programs)
    assert {key: prog.device_in.data_ptr() for key, prog in be.programs.items()} == buffers
    assert [x.data_ptr() for x in be.k] == cache_ptrs
    assert sum(p.runs for p in be.programs.values()) == 2 * sum(runs.values())
    generate(be, ELASTIC, prompt + [40])  # a new canvas length adds programs; the old length's stay
    assert set(programs) < set(be.programs)
    be.MAX_CANVASES = 1
    generate(be, ELASTIC, prompt)  # beyond the limit, the least recently used length is dropped with its programs
    assert set(be.programs) == set(programs) and [x.data_ptr() for x in be.k] == cache_ptrs


def test_padded_step_answers_the_head_from_the_step(tiny_dir):
    be = PaddedTorchBackend(tiny_dir, 1, "cpu")
    n = 24
    ids = np.full(n, be.config.mask_token_id)
    ids[:10] = np.arange(40, 50)
    mask = ids == be.config.mask_token_id
    be.begin(n)
    be.embed(ids)
    for r in range(len(be.ranges)):
        be.refresh(r, np.arange(10, 14), mask)
    queries = np.array([9, 10, 11, 12, 13])
    be.embed(ids[queries], queries)
    stats = be.fetch([be.window(r, queries, np.array([9]), np.arange(10, 14), mask) for r in range(len(be.ranges))])
    assert all(s.colsum.shape == (1, n) and s.drift.shape == (1, 2) for s in stats)
    tokens, probs = be.head(np.arange(10, 14))
    assert tokens.shape == (4,) and probs.shape == (4,)
    with pytest.raises(ValueError, match="window rows"):
        be.head(np.arange(10, 12))


@cuda
def test_cuda_graphs_decode_like_cpu(tiny_dir, plain, prompts):
    graphed = PaddedTorchBackend(tiny_dir, 1, "cuda", graphs=True, fast=False)
    for opts in CASES:
        for prompt in prompts[:2]:
            a, b = generate(plain, opts, prompt), generate(graphed, opts, prompt)
            assert a.canvas_ids == b.canvas_ids, opts
    assert graphed.captures == sum(1 for p in graphed.programs.values() if p.replay is not None) > 0


def test_gpu_check_runs_on_cpu(tmp_path):
    """tools/gpu_check.sh as a GPU session runs it (its own import shim, no install), on small CPU shapes: every
    section must run without failing."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH="")
    run = subprocess.run(["bash", str(repo / "tools" / "gpu_check.sh"), "--device", "cpu", "--quick"], env=env,
                         capture_output=True, text=True, timeout=600)
    report = (tmp_path / "gpu_check.md").read_text()
    assert run.returncode == 0, run.stderr[-2000:]
    assert "failed" not in report, report
    for header in ("## (a)", "## (b)", "## (c)", "## (d)", "## (e)", "## (f)", "## (g)"):
        assert header in report
    assert "| 64 | window | 13 | graphs |" in report and "| elastic (next) | 1/1 | 1/1 | 1/1 |" in report


def test_gpu_check_projection_arithmetic():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from gpu_check import PUBLISHED, project

    measured = {"canvas": 1024, (1024, "window", "graphs"): 0.010, (1024, "refresh", "graphs"): 0.100,
                (1024, "dual block", "graphs"): 0.020}
    r = project(measured, dict(PUBLISHED, elastic_tpf=3.0, fastdllm_tpf=2.0, refresh_fraction=0.1, block=32))
    assert set(r) == {"graphs"}
    assert abs(r["graphs"]["elastic_step_ms"] - 20.0) < 1e-9 and abs(r["graphs"]["elastic_tps"] - 150.0) < 1e-9
    # Fast-dLLM: a block of 32 tokens at 2 tokens/step takes 16 steps, sharing one full refresh (100 ms)
    assert abs(r["graphs"]["fastdllm_step_ms"] - 26.25) < 1e-9 and abs(r["graphs"]["fastdllm_tps"] - 2 / 0.02625) < 1e-9
