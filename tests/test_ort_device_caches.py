"""Caches kept as OrtValues on the execution provider's device (what the CUDA provider uses), run here on the CPU
provider: the same helper graphs and bindings, compared with numpy indexing and with the numpy-cache path."""
import numpy as np
import onnxruntime as ort
import pytest

from dllm_trt.runtime.backends.base import BackendError
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.backends.ort_arrays import DeviceArrays
from dllm_trt.runtime.backends.torch_backend import TorchBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DecodeOptions, build

GEN = 32
CASES = [DecodeOptions(cache="none", window=8), DecodeOptions(cache="dual"), DecodeOptions(cache="prefix"),
         DecodeOptions(cache="elastic", window=8, gamma=0.97),
         DecodeOptions(cache="elastic", window=8, gamma=0.995, refresh_alignment="next", drift_metric="keys")]


def host(value):
    return value if isinstance(value, np.ndarray) else value.numpy()


@pytest.fixture(scope="module")
def backends(tiny_dir, tiny_engines):
    return {"host": OnnxRuntimeBackend(tiny_engines, threads=1, caches="host"),
            "device": OnnxRuntimeBackend(tiny_engines, threads=1, caches="device"),
            "torch": TorchBackend(tiny_dir, layers_per_range=2)}


@pytest.mark.parametrize("shape,axis", [((3, 11, 4), 1), ((11, 6), 0), ((2, 9, 5), 1)])
def test_helper_graphs_write_and_read_rows_like_numpy(shape, axis):
    rng = np.random.default_rng(0)
    arrays = DeviceArrays(ort, "fp32", ["CPUExecutionProvider"], "cpu")
    data = rng.standard_normal(shape).astype(np.float32)
    positions = np.array([7, 0, 3], dtype=np.int64)
    rows_shape = list(shape)
    rows_shape[axis] = len(positions)
    rows = rng.standard_normal(rows_shape).astype(np.float32)

    written = arrays.put_rows(ort.OrtValue.ortvalue_from_numpy(data.copy()), axis, positions, rows)
    expected = data.copy()
    expected[(slice(None),) * axis + (positions,)] = rows
    assert np.array_equal(written.numpy(), expected)

    taken = arrays.take_rows(written, axis, positions[::-1].copy())
    assert np.array_equal(taken.numpy(), np.take(expected, positions[::-1], axis=axis))


def test_device_caches_equal_host_caches_for_every_policy_and_order(backends, prompts):
    for opts in CASES:
        for order in ("range", "batched"):
            for prompt in prompts[:3]:
                results = {}
                for name in ("host", "device"):
                    schedule, policy = build(opts, GEN)
                    backend = backends[name]
                    res = Decoder(backend, policy, schedule, step_order=order).generate(prompt)
                    results[name] = res, [host(backend.k[L]).copy() for L in range(backend.config.n_layers)]
                (a, ka), (b, kb) = results["host"], results["device"]
                assert a.canvas_ids == b.canvas_ids, (opts, order)
                assert (a.steps, a.layer_steps_refreshed) == (b.steps, b.layer_steps_refreshed), (opts, order)
                assert all(np.array_equal(x, y) for x, y in zip(ka, kb)), (opts, order)


def test_device_caches_decode_like_the_torch_reference(backends, prompts):
    opts = DecodeOptions(cache="elastic", window=8, gamma=0.97)
    for prompt in prompts[:4]:
        tokens = {}
        for name in ("device", "torch"):
            schedule, policy = build(opts, GEN)
            tokens[name] = Decoder(backends[name], policy, schedule).generate(prompt).canvas_ids
        assert tokens["device"] == tokens["torch"]


def test_device_caches_stay_ortvalues_with_one_spare_per_shape(backends, prompts):
    backend = backends["device"]
    schedule, policy = build(DecodeOptions(cache="elastic", window=8, gamma=0.97), GEN)
    Decoder(backend, policy, schedule).generate(prompts[0])
    assert all(isinstance(t, ort.OrtValue) for t in backend.k + backend.v + backend.q + backend.boundary)
    spares = backend.arrays._spare
    assert spares and all(len(buffers) == 1 for buffers in spares.values())


def test_window_before_a_full_refresh_is_refused(backends):
    backend = backends["device"]
    backend.begin(16)
    rows = np.arange(4)
    backend.embed(np.zeros(4, dtype=np.int64), rows)
    with pytest.raises(ValueError, match="full refresh"):
        backend.window(0, rows, rows, rows, np.zeros(16, dtype=bool))


def test_unknown_cache_place_is_one_line(tiny_engines, monkeypatch):
    monkeypatch.setenv("DLLM_TRT_ORT_CACHES", "gpu-ish")
    with pytest.raises(BackendError, match="'host' or 'device'"):
        OnnxRuntimeBackend(tiny_engines, threads=1)


CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_device_caches_decode_like_the_cpu(backends, tiny_engines, prompts):
    # fp32 without TF32, so that CUDA and CPU pick the same tokens
    cuda = OnnxRuntimeBackend(tiny_engines, providers=[("CUDAExecutionProvider", {"use_tf32": 0}),
                                                       "CPUExecutionProvider"])
    assert cuda.device_caches and cuda.one_sync_per_step
    for opts in CASES:
        for prompt in prompts[:3]:
            ids = []
            for backend in (backends["host"], cuda):
                schedule, policy = build(opts, GEN)
                ids.append(Decoder(backend, policy, schedule).generate(prompt).canvas_ids)
            assert ids[0] == ids[1], opts
