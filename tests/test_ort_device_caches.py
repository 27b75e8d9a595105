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
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
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


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_helper_graphs_write_and_read_rows_like_numpy(dtype):
    rng = np.random.default_rng(0)
    arrays = DeviceArrays(ort, dtype, ["CPUExecutionProvider"], "cpu")
    np_type = np.float32 if dtype == "fp32" else np.float16
    shapes, axes = [(3, 11, 4), (2, 11, 5), (11, 6)], [1, 1, 0]
    data = [rng.standard_normal(s).astype(np_type) for s in shapes]
    positions = np.array([7, 0, 3], dtype=np.int64)
    rows = []
    for shape, axis in zip(shapes, axes):
        rows.append(rng.standard_normal(shape[:axis] + (3,) + shape[axis + 1:]).astype(np_type))

    written = arrays.put_rows([ort.OrtValue.ortvalue_from_numpy(d.copy()) for d in data], axes, positions, rows)
    expected = [d.copy() for d in data]
    for e, axis, r in zip(expected, axes, rows):
        e[(slice(None),) * axis + (positions,)] = r
    assert all(np.array_equal(w.numpy(), e) for w, e in zip(written, expected))

    order = positions[::-1].copy()
    taken = arrays.take_rows(written[:2], 1, order)
    assert all(np.array_equal(t.numpy(), np.take(e, order, axis=1)) for t, e in zip(taken, expected[:2]))


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


def test_device_caches_stay_ortvalues_with_one_range_of_spares(backends, prompts):
    backend = backends["device"]
    schedule, policy = build(DecodeOptions(cache="elastic", window=8, gamma=0.97), GEN)
    Decoder(backend, policy, schedule).generate(prompts[0])
    assert all(isinstance(t, ort.OrtValue) for t in backend.k + backend.v + backend.q + backend.boundary)
    cfg, spares = backend.config, backend.arrays._spare
    most_layers = max(b - a for a, b in backend.ranges)
    assert len(backend.ranges) > 1 and most_layers < cfg.n_layers
    assert len(spares[(1, cfg.n_heads, backend.n_positions, cfg.head_dim)]) == 3 * most_layers
    assert len(spares[(1, backend.n_positions, cfg.d_model)]) == 1


def test_window_before_a_full_refresh_is_refused(backends):
    backend = backends["device"]
    backend.begin(16)
    rows = np.arange(4)
    backend.embed(np.zeros(4, dtype=np.int64), rows)
    with pytest.raises(ValueError, match="full refresh"):
        backend.window(0, rows, rows, rows, np.zeros(16, dtype=bool))


@pytest.mark.skipif(CUDA, reason="needs a machine where CUDA cannot start")
@pytest.mark.filterwarnings("ignore:Specified provider")   # ONNX Runtime's own warning about the same
def test_a_provider_that_cannot_start_falls_back_to_the_cpu_with_a_warning(tiny_engines, prompts, capsys):
    backend = OnnxRuntimeBackend(tiny_engines, threads=1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "could not start CUDAExecutionProvider; running on CPUExecutionProvider" in capsys.readouterr().err
    assert backend.on_cpu and not backend.device_caches and backend.describe().startswith("onnxruntime (cpu")
    schedule, policy = build(DecodeOptions(cache="elastic", window=8), GEN)
    assert Decoder(backend, policy, schedule).generate(prompts[0]).steps > 0


def test_unknown_cache_place_is_one_line(tiny_engines, monkeypatch):
    monkeypatch.setenv("DLLM_TRT_ORT_CACHES", "gpu-ish")
    with pytest.raises(BackendError, match="'host' or 'device'"):
        OnnxRuntimeBackend(tiny_engines, threads=1)



@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_device_caches_decode_like_the_cpu(backends, tiny_engines, prompts):
    # fp32 without TF32, so that CUDA and CPU pick the same tokens
    cuda = OnnxRuntimeBackend(tiny_engines, providers=[("CUDAExecutionProvider", {"use_tf32": 0}),
                                                       "CPUExecutionProvider"])
    assert cuda.device_caches and cuda.provider == "CUDAExecutionProvider"
    cuda.warmup(64)
    for opts in CASES:
        for prompt in prompts[:3]:
            ids = []
            for backend in (backends["host"], cuda):
                schedule, policy = build(opts, GEN)
                ids.append(Decoder(backend, policy, schedule).generate(prompt).canvas_ids)
            assert ids[0] == ids[1], opts


def test_a_canvas_of_the_same_length_reuses_the_device_buffers(backends, prompts):
    backend = backends["device"]

    def buffers():
        held = backend._buffers()
        return {t.data_ptr() for t in held + [t for spare in backend.arrays._spare.values() for t in spare]}

    schedule, policy = build(DecodeOptions(cache="elastic", window=8, gamma=0.97), GEN)
    Decoder(backend, policy, schedule).generate(prompts[0])
    first = buffers()
    Decoder(backend, policy, schedule).generate(prompts[0])
    assert buffers() == first
    longer = next(p for p in prompts if len(p) != len(prompts[0]))
    Decoder(backend, policy, schedule).generate(longer)
    one_row = (1, backend.config.n_heads, 1, backend.config.head_dim)   # refresh mode's unused tracked query
    assert all(backend.n_positions in shape or shape == one_row for shape in backend.arrays._spare)
