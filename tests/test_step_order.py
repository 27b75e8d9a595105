"""The two step orders give identical decisions, caches and tokens: deciding after each window pass (CPU), and
running every window pass first with one read of the statistics per step (GPU)."""
import numpy as np
import pytest

from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.backends.torch_backend import TorchBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DecodeOptions, build

GEN = 32
CASES = [DecodeOptions(cache="none", window=8, threshold=0.08), DecodeOptions(cache="dual", threshold=0.08),
         DecodeOptions(cache="prefix", threshold=0.08)]
CASES += [DecodeOptions(cache="elastic", window=8, threshold=0.08, gamma=g, refresh_alignment=al, drift_metric=m)
          for g in (0.97, 0.995, 1.5) for al in ("rerun", "next") for m in ("heads", "keys")]


@pytest.fixture(scope="module")
def backends(tiny_dir, tiny_engines):
    return {"torch x1": TorchBackend(tiny_dir, layers_per_range=1), "onnxruntime x2": OnnxRuntimeBackend(tiny_engines, threads=1)}


def run(backend, opts, prompt, order):
    schedule, policy = build(opts, GEN)
    res = Decoder(backend, policy, schedule, step_order=order).generate(prompt)
    caches = [np.asarray(backend.k[L]).copy() if isinstance(backend.k[L], np.ndarray) else backend.k[L].numpy().copy()
              for L in range(backend.config.n_layers)]
    return res, caches


@pytest.mark.parametrize("name", ["torch x1", "onnxruntime x2"])
def test_batched_order_equals_range_by_range(backends, prompts, name):
    backend = backends[name]
    partial = 0  # generations that refreshed some layers but not all: drift found below the top range
    for opts in CASES:
        for prompt in prompts[:4]:
            a, ca = run(backend, opts, prompt, "range")
            b, cb = run(backend, opts, prompt, "batched")
            assert a.canvas_ids == b.canvas_ids, opts
            assert (a.steps, a.layer_steps_refreshed) == (b.steps, b.layer_steps_refreshed), opts
            assert all(np.array_equal(x, y) for x, y in zip(ca, cb)), opts
            partial += 0 < a.layer_steps_refreshed - backend.config.n_layers < (a.steps - 1) * backend.config.n_layers
    assert partial, "no generation refreshed from a middle range: the orders were not really compared"


def test_auto_order_follows_the_backend(backends):
    schedule, policy = build(DecodeOptions(), GEN)
    assert Decoder(backends["onnxruntime x2"], policy, schedule).step_order == "range"
    with pytest.raises(ValueError, match="step order"):
        Decoder(backends["onnxruntime x2"], policy, schedule, step_order="sideways")
