"""Weight-only int8/int4 pieces: the Gemm/Transpose rewrite, the export, the check, and running them with the
shared-weights loading."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.cli import main
from dllm_trt.export.check import QUANT_TOLERANCE, check_engines, compare
from dllm_trt.export.onnx_export import export_model
from dllm_trt.export.quantize import lookup_as_gather, quantize_model, weights_as_matmul
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.manifest import TensorSpec, load_manifest
from dllm_trt.runtime.policies import make_policy
from dllm_trt.runtime.schedule import WindowSchedule

# one worker runs this module: its module fixtures (exports, builds) run once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_quantize")


@pytest.fixture(scope="module")
def quantized(tiny_dir, tiny_engines, tmp_path_factory):
    """int8 and int4 exports of the tiny model, next to its session-wide fp32 export (same layer ranges)."""
    root = tmp_path_factory.mktemp("quant")
    return {"fp32": tiny_engines} | {
        s: export_model(tiny_dir, root / s, layers_per_range=2, max_len=64, max_active=32, quiet=True, quantize=s,
                        quant_block=32) and root / s
        for s in ("int8", "int4")}


def _gemm_and_transpose_model():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)   # Gemm(x, w1, transB=1): [N=6, K=4]
    w2 = rng.standard_normal((5, 6)).astype(np.float32)   # MatMul(h, Transpose(w2))
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
             helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "w2t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_gemm_and_transposed_weights_become_matmul_on_k_by_n_weights():
    model = _gemm_and_transpose_model()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    before = _run(model, x)
    assert weights_as_matmul(model) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul"]
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert shapes == {"w1": [4, 6], "w2": [6, 5]}
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)


def test_embedding_lookup_becomes_gather_and_then_4_bit_rows():
    table = np.random.default_rng(2).standard_normal((40, 64)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["ids", "axes"], ["idx"]),
             helper.make_node("GatherND", ["table", "idx"], ["y"], batch_dims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                              [numpy_helper.from_array(table, "table"),
                               numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    ids = np.array([3, 0, 39, 3], np.int64)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]
    assert lookup_as_gather(model) == 1 and [n.op_type for n in model.graph.node] == ["Gather"]
    np.testing.assert_array_equal(run(model), table[ids])
    q = quantize_model(model, "int4", 32, lookup=True)
    assert [n.op_type for n in q.graph.node] == ["GatherBlockQuantized"]
    got = run(q)
    assert 0 < np.linalg.norm(got - table[ids]) / np.linalg.norm(table[ids]) < 0.15


def test_lookup_on_another_axis_is_left_alone():
    """GatherND(W, Unsqueeze(ids, 1)) is a row lookup only for 1-D ids: with [n, 2] ids it is not, so it stays."""
    nodes = [helper.make_node("Unsqueeze", ["ids", "axes"], ["idx"]),
             helper.make_node("GatherND", ["table", "idx"], ["y"], batch_dims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.zeros((40, 64), np.float32), "table"),
                               numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert lookup_as_gather(model) == 0 and [n.op_type for n in model.graph.node] == ["Unsqueeze", "GatherND"]


def test_gemm_with_bias_or_scale_is_left_alone():
    model = _gemm_and_transpose_model()
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 2.0))
    assert weights_as_matmul(model) == 1
    assert model.graph.node[0].op_type == "Gemm"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_export_records_the_scheme_and_shares_weights(quantized, scheme):
    m = load_manifest(quantized[scheme])
    assert m.quantization["scheme"] == scheme and m.quantization["block_size"] == 32
    assert m.quantization["bits"] == {"int8": 8, "int4": 4}[scheme] and m.quantization["onnxruntime"] == ort.__version__
    fp32 = load_manifest(quantized["fp32"])
    assert fp32.quantization == {} and "quantization" not in json.loads(
        (quantized["fp32"] / "manifest.json").read_text())
    for p in m.pieces:
        ops = {n.op_type for n in onnx.load(str(quantized[scheme] / p.file), load_external_data=False).graph.node}
        assert ("MatMulNBits" in ops) == (p.kind != "embed"), p.name
        assert ("GatherBlockQuantized" in ops) == (p.kind == "embed" and scheme == "int4"), p.name
        assert not ops & {"Gemm"}
    window = {p.name: p.data_size for p in m.pieces if p.kind == "layers"}
    window32 = {p.name: p.data_size for p in fp32.pieces if p.kind == "layers"}
    for name, size in window.items():
        assert size < window32[name] / {"int8": 2.5, "int4": 4}[scheme]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_check_passes_within_the_scheme_tolerances_and_sees_real_rounding(quantized, scheme):
    rows = check_engines(quantized[scheme])
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    layer_rows = [r for r in rows if r.piece.startswith("layers_") and r.output.startswith("hidden")]
    assert all(r.measure == "rel" and r.tolerance == QUANT_TOLERANCE[scheme]["act"] for r in layer_rows)
    assert all(r.max_abs > 1e-4 for r in layer_rows)   # the weights really are rounded
    embed = [r for r in rows if r.piece.startswith("embed ")]
    if scheme == "int8":   # float embedding: fp32 tolerance
        assert embed and all(r.measure == "abs" and r.tolerance == 2e-4 for r in embed)
    else:                  # 4-bit embedding rows
        assert embed and all(r.measure == "rel" and r.max_abs > 1e-4 for r in embed)


def test_compare_fails_beyond_the_tolerance():
    t = TensorSpec("hidden_states_out", "float32", [2, 2])
    w = np.ones((2, 2), np.float32)
    assert compare("p", t, w * 1.01, w, "int8").ok
    assert not compare("p", t, w * 1.05, w, "int8").ok
    tokens = TensorSpec("tokens", "int64", [4])
    assert compare("head", tokens, np.array([1, 2, 3, 9]), np.array([1, 2, 3, 4]), "int4").ok
    assert not compare("head", tokens, np.array([1, 2, 8, 9]), np.array([1, 2, 3, 4]), "int8").ok


def test_quantized_engine_runs_on_shared_weights(quantized, prompts):
    backend = OnnxRuntimeBackend(quantized["int4"], threads=1)
    assert backend.share_weights and backend.prepack and "int4 weights" in backend.describe()
    m = backend.manifest
    for a, b in m.layer_ranges:
        assert any(name.endswith("_Q4") for name in backend.initializer_addresses[f"layers_{a:02d}_{b:02d}"])
    runs = [Decoder(b, make_policy("elastic"), WindowSchedule(24, 8, 0.1)).generate(prompts[0])
            for b in (backend, OnnxRuntimeBackend(quantized["int4"], threads=1, share_weights=False))]
    assert runs[0].canvas_ids == runs[1].canvas_ids and runs[0].tokens > 0
    # every stored byte counts, the 4-bit embedding table (which ONNX Runtime loads itself) included
    data = sum(f.stat().st_size for f in quantized["int4"].glob("*.onnx.data"))
    assert backend.weight_bytes == data


def test_quantized_engines_prepack_by_default_and_float_ones_do_not(quantized, monkeypatch):
    """MatMulNBits without its packed weights takes a slow dequantizing path (and rounds differently)."""
    monkeypatch.delenv("DLLM_TRT_ORT_PREPACK", raising=False)
    assert OnnxRuntimeBackend(quantized["int8"], threads=1).prepack
    assert not OnnxRuntimeBackend(quantized["fp32"], threads=1).prepack


def test_manifest_with_a_bad_quantization_record_is_refused(quantized, tmp_path):
    eng = tmp_path / "e"
    shutil.copytree(quantized["int8"], eng)
    raw = json.loads((eng / "manifest.json").read_text())
    raw["quantization"]["scheme"] = "int3"
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="quantization must be"):
        load_manifest(eng)


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int8", "--quant-block", "24"], "--quant-block must be one of 16, 32, 64, 128, 256"),
    (["--quantize", "int4", "--quant-block", "512"], "--quant-block must be one of 16, 32, 64, 128, 256"),
    (["--quant-block", "64"], "--quant-block needs --quantize int8 or int4"),
    (["--quantize", "int4", "--dtype", "bf16"], "--quantize needs --dtype fp32"),
])
def test_export_flag_mistakes_are_one_line(tiny_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", str(tiny_dir), "--out", str(tmp_path / "e"), *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_importing_the_quantizer_leaves_the_root_logger_alone():
    """onnxruntime's quantizer module sets the root logger to INFO when imported; an export would then print every
    library's INFO lines (hundreds of onnxscript constant-folding notes). A fresh interpreter, so that the import
    really happens."""
    import logging
    import subprocess
    import sys

    code = ("import logging\n"
            "from dllm_trt.export.quantize import quantizer_class\n"
            "quantizer_class()\n"
            "root = logging.getLogger()\n"
            "print(root.level, len(root.handlers))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(logging.WARNING), "0"]
