"""A mid-size random model (hidden 1024, 8 layers) goes through the same export path range by range and runs."""
import numpy as np

from dllm_trt.export.checkpoint_writer import write_tiny_checkpoint
from dllm_trt.export.onnx_export import export_model
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.backends.torch_backend import TorchBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.policies import make_policy
from dllm_trt.runtime.schedule import WindowSchedule


def test_midsize_export_runs_and_matches_torch(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "mid", seed=3, n_layers=8, d_model=1024, n_heads=16, max_len=256)
    manifest = export_model(model, tmp_path / "eng", layers_per_range=4, max_len=96, max_active=48, quiet=True)
    assert [p.name for p in manifest.pieces] == ["embed", "layers_00_04", "layers_04_08", "head"]
    # one graph per range (both modes): each range's weights are on disk once
    weights_per_range = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2080) * 4
    for p in manifest.pieces:
        if p.kind == "layers":
            assert weights_per_range <= p.data_size < 1.01 * weights_per_range
    total = sum(f.stat().st_size for f in (tmp_path / "eng").iterdir())
    assert total < 1.2 * (2 * weights_per_range + 2 * 262 * 1024 * 4)
    prompt = np.random.default_rng(0).integers(32, 127, 20).tolist()
    runs = [Decoder(backend, make_policy("elastic"), WindowSchedule(24, window=8, threshold=0.5)).generate(prompt)
            for backend in (OnnxRuntimeBackend(tmp_path / "eng"), TorchBackend(model, layers_per_range=4))]
    assert runs[0].canvas_ids == runs[1].canvas_ids
    assert runs[0].tokens > 0
