"""One shared, memory-mapped copy of the weights on the ONNX Runtime backend; warmup; memory figures."""
import subprocess
import sys

import numpy as np
import onnx
import pytest

from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.manifest import load_manifest
from dllm_trt.runtime.memory import SharedWeights, external_initializers, peak_rss_bytes, smaps_rollup
from dllm_trt.runtime.policies import make_policy
from dllm_trt.runtime.schedule import WindowSchedule


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return tiny_engines


def generate(backend, prompts, gen=24):
    return [Decoder(backend, make_policy("elastic"), WindowSchedule(gen, 8, 0.1)).generate(p).canvas_ids
            for p in prompts]


def test_each_range_session_reads_its_weights_from_the_mapped_file(engines):
    backend = OnnxRuntimeBackend(engines, threads=1)
    assert backend.share_weights and not backend.prepack
    m = load_manifest(engines)
    for a, b in m.layer_ranges:
        addresses = backend.initializer_addresses[f"layers_{a:02d}_{b:02d}"]
        mapping = backend.shared.maps[(engines / f"layers_{a:02d}_{b:02d}.onnx.data").resolve()]
        start = mapping.ctypes.data
        assert addresses and all(start <= addr < start + mapping.nbytes for addr in addresses.values())
    assert len(backend.shared.values) == sum(len(external_initializers(engines / p.file)) for p in m.pieces)


def test_sessions_read_the_shared_pages(engines, monkeypatch, prompts):
    """Writing into the (copy-on-write) mapping changes what a range computes in both modes: no private copy."""
    monkeypatch.setattr(SharedWeights, "file_mode", "c")
    backend = OnnxRuntimeBackend(engines, threads=1)
    before = generate(backend, prompts[:2])
    for key, array in backend.shared.arrays.items():
        if key[0].name.startswith("layers_") and array.ndim == 2:
            array[...] = 0   # every projection of every layer: attention and MLP then add nothing
    n = 40
    key_is_mask = np.zeros(n, dtype=bool)
    backend.begin(n)
    backend.embed(np.arange(n) % 200)
    hidden = backend.boundary[0].copy()
    for r in range(len(backend.ranges)):
        backend.refresh(r, np.arange(4), key_is_mask)
    np.testing.assert_allclose(backend.final, hidden, rtol=0, atol=0)   # refresh sessions saw the zeros
    rows = np.arange(10, 20)
    backend.embed(rows % 200, rows)
    for r in range(len(backend.ranges)):
        backend.window(r, rows, rows[:2], rows[2:], key_is_mask)
    np.testing.assert_allclose(backend.current, hidden[:, rows], rtol=0, atol=0)   # and so did the window sessions
    assert generate(backend, prompts[:2]) != before


def test_shared_loading_matches_per_session_loading_token_for_token(engines, prompts):
    shared = OnnxRuntimeBackend(engines, threads=1)
    own = OnnxRuntimeBackend(engines, threads=1, share_weights=False)
    assert not own.share_weights and own.prepack and not own.initializer_addresses["head"]
    assert generate(shared, prompts[:6]) == generate(own, prompts[:6])


def test_warmup_runs_and_leaves_no_state(engines, prompts):
    cold = generate(OnnxRuntimeBackend(engines, threads=1), prompts[:3])
    backend = OnnxRuntimeBackend(engines, threads=1)
    backend.warmup()
    backend.warmup(16)
    assert generate(backend, prompts[:3]) == cold


def test_weight_bytes_is_the_data_files_counted_once(engines):
    files = sorted(engines.glob("*.onnx.data"))
    assert len(files) == len(load_manifest(engines).pieces)   # one graph per range: no second copy to share
    total = sum(f.stat().st_size for f in files)
    assert OnnxRuntimeBackend(engines, threads=1).weight_bytes == total
    assert OnnxRuntimeBackend(engines, threads=1, share_weights=False).weight_bytes == total


def test_initializer_table_matches_onnx(engines):
    for path in engines.glob("*.onnx"):
        want = []
        for t in onnx.load(str(path), load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                want.append((t.name, t.data_type, tuple(t.dims), info["location"], int(info.get("offset", 0)),
                             int(info["length"])))
        got = [(t.name, t.data_type, t.dims, t.location, t.offset, t.length) for t in external_initializers(path)]
        assert got == want and got, path.name


def test_bf16_tensors_become_bf16_values(tiny_bf16_engines):
    """bf16 graphs run on GPUs only, but their tensors must map to OrtValues of the right type and bytes."""
    import onnxruntime as ort

    out = tiny_bf16_engines
    weights = SharedWeights(ort.OrtValue)
    names, values = weights.initializers(out / "layers_00_04.onnx")
    assert names and all(v.data_type() == "tensor(bfloat16)" for v in values)
    table = {t.name: t for t in external_initializers(out / "layers_00_04.onnx")}
    raw = (out / "layers_00_04.onnx.data").read_bytes()
    t = table[names[-1]]
    assert weights.arrays[next(k for k in weights.arrays if k[1] == t.offset)].tobytes() == \
        raw[t.offset:t.offset + t.length]


def test_memory_figures():
    assert peak_rss_bytes() >= smaps_rollup().get("Rss", 0) > 0
    assert smaps_rollup()["Pss"] > 0


def test_onnxruntime_path_imports_neither_torch_nor_onnx(engines):
    code = (
        "import sys\n"
        "from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend\n"
        "from dllm_trt.runtime.memory import peak_rss_bytes\n"
        f"b = OnnxRuntimeBackend(r'{engines}', threads=1)\n"
        "b.warmup()\n"
        "print(b.weight_bytes, peak_rss_bytes())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))\n"
        "assert not bad, bad\n"
        "print('LEAN')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "LEAN" in proc.stdout


def test_weight_mode_from_environment(engines, monkeypatch):
    monkeypatch.setenv("DLLM_TRT_ORT_WEIGHTS", "per-session")
    assert not OnnxRuntimeBackend(engines, threads=1).share_weights
    monkeypatch.setenv("DLLM_TRT_ORT_WEIGHTS", "shared")
    monkeypatch.setenv("DLLM_TRT_ORT_PREPACK", "1")
    b = OnnxRuntimeBackend(engines, threads=1)
    assert b.share_weights and b.prepack
    monkeypatch.setenv("DLLM_TRT_ORT_WEIGHTS", "both")
    with pytest.raises(Exception, match="DLLM_TRT_ORT_WEIGHTS"):
        OnnxRuntimeBackend(engines, threads=1)


def test_prepacked_sessions_release_their_mapped_pages_and_decode_the_same(engines, prompts, monkeypatch):
    """With pre-packing, the kernels read their own packed copies: each piece's mapping is released (MADV_DONTNEED,
    read back from the file if a tensor is read again), and the tokens stay those of the default mode."""
    released = []
    real = SharedWeights.release
    monkeypatch.setattr(SharedWeights, "release", lambda self, f: released.append(f.name) or real(self, f))
    packed = OnnxRuntimeBackend(engines, threads=1, prepack=True)
    assert packed.share_weights and packed.prepack
    assert sorted(released) == sorted(p.data_file for p in load_manifest(engines).pieces if p.data_file)
    assert generate(packed, prompts[:3]) == generate(OnnxRuntimeBackend(engines, threads=1), prompts[:3])
