"""Exported ONNX pieces on ONNX Runtime: contract, numerical parity with the torch reference, generation parity,
the lean import path and the user-facing errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from dllm_trt.export.check import check_engines
from dllm_trt.export.onnx_export import export_model
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.backends.torch_backend import TorchBackend
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.manifest import load_manifest
from dllm_trt.runtime.policies import make_policy
from dllm_trt.runtime.schedule import BlockSchedule, WindowSchedule

GEN, THRESHOLD = 32, 0.08


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return tiny_engines


def test_manifest_matches_onnx_graphs(engines):
    m = load_manifest(engines, verify_data=True)
    types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}
    for piece in m.pieces:
        graph = onnx.load(str(engines / piece.file), load_external_data=False).graph
        for specs, values in ((piece.inputs, graph.input), (piece.outputs, graph.output)):
            assert [t.name for t in specs] == [v.name for v in values], piece.name
            for t, v in zip(specs, values):
                assert types[v.type.tensor_type.elem_type] == t.dtype, (piece.name, t.name)
                dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                assert dims == t.shape, (piece.name, t.name, dims, t.shape)


@pytest.mark.parametrize("sizes", [
    {"seq_len": 2, "rows": 1, "track_len": 1, "window_len": 1, "n_tokens": 1, "n_hidden": 1, "n_rows": 1, "batch": 1},
    {"seq_len": 50, "rows": 20, "track_len": 4, "window_len": 16, "n_tokens": 50, "n_hidden": 50, "n_rows": 16,
     "batch": 2},
    {"seq_len": 128, "rows": 64, "track_len": 7, "window_len": 9, "n_tokens": 3, "n_hidden": 64, "n_rows": 9,
     "batch": 3},
    {"seq_len": 320, "rows": 33, "track_len": 5, "window_len": 16, "n_tokens": 320, "n_hidden": 320, "n_rows": 16,
     "batch": 5},
], ids=["smallest", "b2", "b3", "b5"])
def test_every_piece_matches_torch_at_other_sizes(engines, tiny_dir, sizes):
    rows = check_engines(engines, tiny_dir, seed=sizes["seq_len"], sizes=sizes)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    assert len(rows) > 20


@pytest.fixture(scope="module")
def both(engines, tiny_dir):
    return OnnxRuntimeBackend(engines, threads=1), TorchBackend(tiny_dir, layers_per_range=2)


SCHEDULES = {
    "none": lambda: BlockSchedule(GEN, 16, steps=GEN),
    "prefix": lambda: BlockSchedule(GEN, 16, threshold=THRESHOLD),
    "dual": lambda: BlockSchedule(GEN, 16, threshold=THRESHOLD),
    "elastic": lambda: WindowSchedule(GEN, 8, threshold=THRESHOLD),
}


@pytest.mark.parametrize("cache", list(SCHEDULES))
def test_generation_matches_torch_backend(both, prompts, cache):
    ort_backend, torch_backend = both
    for prompt in prompts:
        a = Decoder(ort_backend, make_policy(cache), SCHEDULES[cache]()).generate(prompt)
        b = Decoder(torch_backend, make_policy(cache), SCHEDULES[cache]()).generate(prompt)
        assert a.canvas_ids == b.canvas_ids
        assert (a.steps, a.layer_steps_refreshed) == (b.steps, b.layer_steps_refreshed)


def test_elastic_always_refresh_equals_none_on_onnxruntime(both, prompts):
    ort_backend, _ = both
    for prompt in prompts:
        want = Decoder(ort_backend, make_policy("none"), WindowSchedule(GEN, 8, THRESHOLD)).generate(prompt)
        got = Decoder(ort_backend, make_policy("elastic", gamma=1.5), WindowSchedule(GEN, 8, THRESHOLD)).generate(prompt)
        assert got.canvas_ids == want.canvas_ids and got.refresh_fraction == 1.0


def test_onnxruntime_path_never_imports_torch(engines):
    code = (
        "import sys\n"
        "from dllm_trt.cli import main\n"
        f"main(['generate', '--engines', r'{engines}', '--prompt', 'Hello', '--gen-length', '16', '--json'])\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('NO_TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "NO_TORCH" in proc.stdout and '"tokens"' in proc.stdout


def cli(args):
    proc = subprocess.run([sys.executable, "-m", "dllm_trt.cli", *args], capture_output=True, text=True)
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture
def engines_copy(engines, tmp_path):
    return shutil.copytree(engines, tmp_path / "copy")


def test_edited_onnx_file_is_refused(engines_copy):
    with open(engines_copy / "head.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"head.onnx: sha256 does not match manifest.json"):
        load_manifest(engines_copy)
    proc = cli(["generate", "--engines", str(engines_copy), "--prompt", "Hi"])
    assert proc.returncode == 2 and "sha256 does not match" in proc.stderr


def test_missing_onnx_file_is_refused(engines_copy):
    (engines_copy / "embed.onnx").unlink()
    proc = cli(["generate", "--engines", str(engines_copy), "--prompt", "Hi"])
    assert proc.returncode == 2 and "embed.onnx: missing" in proc.stderr


def test_unknown_manifest_version_is_refused(engines_copy):
    raw = json.loads((engines_copy / "manifest.json").read_text())
    raw["format_version"] = 99
    (engines_copy / "manifest.json").write_text(json.dumps(raw))
    proc = cli(["generate", "--engines", str(engines_copy), "--prompt", "Hi"])
    assert proc.returncode == 2 and "manifest format version 99 is not supported" in proc.stderr


def test_prompt_longer_than_export_is_refused(engines):
    proc = cli(["generate", "--engines", str(engines), "--prompt", "x" * 300, "--gen-length", "32"])
    assert proc.returncode == 2 and "exceeds the 320 positions available" in proc.stderr


def test_backend_not_installed(engines):
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from dllm_trt.cli import main\n"
            f"main(['generate', '--engines', r'{engines}', '--prompt', 'Hi'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "needs ONNX Runtime: pip install onnxruntime" in proc.stderr and "Traceback" not in proc.stderr


def test_bf16_export_checks_with_reference_evaluator(tiny_dir, tiny_bf16_engines):
    """bf16 graphs are for TensorRT; on CPU they are checked with onnx's reference evaluator against torch bf16."""
    import ml_dtypes
    import torch
    from onnx.reference import ReferenceEvaluator

    from dllm_trt.export.check import _valid, check_sizes, piece_cases
    from dllm_trt.export.onnx_export import _module_and_weights

    m = load_manifest(tiny_bf16_engines)
    spec = m.piece("layers_00_04")
    sizes = check_sizes(m.dims) | {"seq_len": 12, "rows": 5, "track_len": 2, "window_len": 3}
    from dllm_trt.runtime.checkpoint import Checkpoint

    module, weights = _module_and_weights(spec, Checkpoint(tiny_dir), torch.bfloat16)
    module = module.to_empty(device="cpu")
    module.load_state_dict(weights, strict=False, assign=True)
    module.inv_freq = weights["inv_freq"]
    evaluator = ReferenceEvaluator(str(tiny_bf16_engines / spec.file))
    cases = piece_cases(spec, module, m.config, sizes, 2, np.random.default_rng(0), torch.bfloat16)
    for case in cases:
        feeds = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v) for k, v in case.inputs.items()}
        got = evaluator.run(None, feeds)
        for b in range(2):
            for t, g, w in zip(spec.outputs, got, case.want[b]):
                if w is None:
                    continue
                g = _valid(np.asarray(g)[b].astype(np.float32), t.shape[1:], case.extents[b])
                # bf16 keeps 8 significant bits: compare relative to the output's scale
                err = np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))
                assert err < (2e-2 if t.dtype == "float32" else 5e-2), (case.label, t.name, err)
    graph = onnx.load(str(tiny_bf16_engines / spec.file), load_external_data=False).graph
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    value_types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    assert softmax_inputs and all(value_types.get(x, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
                                  for x in softmax_inputs), "softmax must run in float32"


def test_example_sizes_fit_small_export_ranges():
    from dllm_trt.export.onnx_export import example_sizes
    from dllm_trt.runtime.manifest import dims_for

    window_dims = {"seq_len", "rows", "track_len", "window_len"}
    sizes = example_sizes(dims_for(max_len=16, max_active=7), {64, 4, 16, 2}, window_dims)
    assert set(sizes) == window_dims and len(set(sizes.values())) == len(sizes)
    assert all(2 <= v for v in sizes.values()) and sizes["seq_len"] <= 16 and sizes["track_len"] <= 7
    with pytest.raises(ModelError, match="too small to export"):
        example_sizes(dims_for(max_len=16, max_active=3), {64, 4, 16, 2}, window_dims)


def test_opset_23_export_runs_and_matches(tiny_dir, tmp_path, prompts):
    m = export_model(tiny_dir, tmp_path / "o23", layers_per_range=4, opset=23, max_len=96, max_active=32, quiet=True)
    assert m.export["opset"] == 23
    graph = onnx.load(str(tmp_path / "o23" / m.piece("layers_00_04").file), load_external_data=False)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {23}
    ort_backend, torch_backend = OnnxRuntimeBackend(tmp_path / "o23", threads=1), TorchBackend(tiny_dir, 4)
    for prompt in prompts[:3]:
        a = Decoder(ort_backend, make_policy("elastic"), WindowSchedule(GEN, 8, THRESHOLD)).generate(prompt)
        b = Decoder(torch_backend, make_policy("elastic"), WindowSchedule(GEN, 8, THRESHOLD)).generate(prompt)
        assert a.canvas_ids == b.canvas_ids


SHARP = 3.0


def test_drift_output_matches_torch_cosine_on_tiny_attention(engines):
    """The exported window piece's drift statistics against F.cosine_similarity, recomputed here from the piece's
    own new keys/queries, on keys scaled up so that attention is sharply peaked and most probabilities are far
    below the cosine's eps (where clamping the product of the norms instead of each norm gives ~0, not ~1)."""
    import torch

    m = load_manifest(engines)
    spec = m.pieces[1]
    assert spec.kind == "layers"
    cfg, (a, b) = m.config, spec.layers
    rng = np.random.default_rng(5)
    n, active = 96, 12
    positions = np.sort(rng.choice(n, active, replace=False)).astype(np.int64)
    feeds = {"hidden_states": rng.standard_normal((active, cfg.d_model)).astype(np.float32),
             "position_ids": positions, "track_rows": np.array([0, 3, 7]), "window_rows": np.arange(4, 12),
             "key_is_mask": rng.random(n) < 0.3}
    for L in range(a, b):
        feeds[f"past_key_values.{L}.key"] = SHARP * rng.standard_normal((cfg.n_heads, n, cfg.head_dim)).astype(np.float32)
        feeds[f"past_key_values.{L}.value"] = rng.standard_normal((cfg.n_heads, n, cfg.head_dim)).astype(np.float32)
        feeds[f"track_queries.{L}"] = SHARP * rng.standard_normal((cfg.n_heads, 3, cfg.head_dim)).astype(np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(engines / spec.file), providers=["CPUExecutionProvider"])
    batched = {k: v[None] for k, v in feeds.items()} | {"canvas_lengths": np.array([n])}
    out = dict(zip([o.name for o in spec.outputs], (o[0] for o in session.run(None, batched))))
    scale = cfg.head_dim ** -0.5
    tiny_pairs = 0
    for L in range(a, b):
        past_k = torch.from_numpy(feeds[f"past_key_values.{L}.key"])
        keys = past_k.clone()
        keys[:, positions] = torch.from_numpy(out[f"new_key_values.{L}.key"])  # this step's rows replace stale ones
        new_q = torch.from_numpy(out[f"new_queries.{L}"])[:, feeds["track_rows"]]
        new = torch.softmax(new_q @ keys.transpose(1, 2) * scale, -1)
        old = torch.softmax(torch.from_numpy(feeds[f"track_queries.{L}"]) @ past_k.transpose(1, 2) * scale, -1)
        norms = old.norm(dim=0)
        tiny_pairs += int(((norms > 1e-8) & (norms < 1e-4)).sum())  # where the two clamps give different values
        want = torch.nn.functional.cosine_similarity(old, new, dim=0).mean()
        want_keys = torch.nn.functional.cosine_similarity(old, new, dim=-1).mean()
        assert abs(float(out[f"drift.{L}"][0]) - float(want)) < 1e-4, (L, out[f"drift.{L}"], float(want))
        assert abs(float(out[f"drift.{L}"][1]) - float(want_keys)) < 1e-4
    assert tiny_pairs > 100, f"attention was not peaked enough to exercise the eps clamp ({tiny_pairs})"


def test_batched_range_piece_equals_one_call_per_sequence(engines):
    """A layer-range piece at batch 3 (unequal canvases and row counts, NaN in every padded or unread cache
    entry) gives each sequence what a batch-1 call for it alone gives, in both modes. Not bit for bit: ONNX
    Runtime's matmul kernels sum in an order that depends on the padded shape (differences of about 1e-7 here)."""
    import onnxruntime as ort

    from dllm_trt.export.check import _valid, check_sizes, piece_cases

    m = load_manifest(engines)
    spec = m.piece("layers_00_02")

    import torch

    session = ort.InferenceSession(str(engines / spec.file), providers=["CPUExecutionProvider"])
    sizes = check_sizes(m.dims) | {"seq_len": 37, "rows": 11}
    for case in piece_cases(spec, None, m.config, sizes, 3, np.random.default_rng(1), torch.float32):
        together = session.run(None, case.inputs)
        for b, extent in enumerate(case.extents):
            alone_inputs = {}
            for t in spec.inputs:
                value = case.inputs[t.name][b: b + 1]
                alone_inputs[t.name] = (_valid(value[0], t.shape[1:], extent)[None] if t.name != "canvas_lengths"
                                        else value)
            alone = session.run(None, alone_inputs)
            for t, x, y in zip(spec.outputs, together, alone):
                if t.name.startswith("drift") and case.label.startswith("refresh"):
                    continue
                x = _valid(x[b], t.shape[1:], extent)
                np.testing.assert_allclose(x, y[0], rtol=0, atol=2e-6, err_msg=f"{case.label} {t.name} sequence {b}")


def test_version_1_engine_folder_is_refused_with_a_line_to_re_export(engines_copy):
    raw = json.loads((engines_copy / "manifest.json").read_text())
    raw["format_version"] = 1
    (engines_copy / "manifest.json").write_text(json.dumps(raw))
    proc = cli(["generate", "--engines", str(engines_copy), "--prompt", "Hi"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "manifest format 1" in proc.stderr and "re-export it (dllm-trt export --model" in proc.stderr
