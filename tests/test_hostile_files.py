"""Hostile or broken files (issue #21, round 2): each ends in one ModelError line naming the file, never a
traceback, a MemoryError or minutes of allocation."""
import json
import math
import shutil
from dataclasses import asdict

import pytest

from dllm_trt.cli import main
from dllm_trt.runtime import memory
from dllm_trt.runtime.checkpoint import Checkpoint
from dllm_trt.runtime.config import ModelConfig, ModelError, config_from_manifest, load_config, read_json
from dllm_trt.runtime.manifest import load_manifest, piece_specs

HUGE = "9" * 5000   # past Python's int() limit of 4300 digits


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "m")


@pytest.fixture
def engines(tiny_engines, tmp_path):
    return shutil.copytree(tiny_engines, tmp_path / "e")


def edit_json(path, **changes):
    raw = json.loads(path.read_text()) if path.exists() else {}
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return raw


def add_huge_integer(path):
    text = path.read_text().rstrip() if path.exists() else "{}"
    path.write_text(text[:-1] + ("," if text.strip() != "{}" else "") + f' "x": {HUGE}}}')


def edit_header(path, change):
    """Rewrite a safetensors header in place (same length, padded with spaces)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(data[:8] + new.ljust(n) + data[8 + n:])


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dllm-trt: error: ") and err.count("\n") == 1, err
    return err


# ---- 9: integers past Python's digit limit -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_huge_integer_in_checkpoint_json_is_one_line(ckpt, name):
    add_huge_integer(ckpt / name)
    with pytest.raises(ModelError, match=rf"{name}: holds an integer of more than 4300 digits"):
        load_config(ckpt)


def test_huge_integer_in_safetensors_index_is_one_line(ckpt):
    add_huge_integer(ckpt / "model.safetensors.index.json")
    with pytest.raises(ModelError, match=r"model.safetensors.index.json: holds an integer"):
        Checkpoint(ckpt)


def test_huge_integer_in_manifest_is_one_line(engines, capsys):
    add_huge_integer(engines / "manifest.json")
    with pytest.raises(ModelError, match=r"manifest.json: holds an integer of more than 4300 digits"):
        load_manifest(engines)
    assert "manifest.json: holds an integer" in one_line_error(capsys, ["check", str(engines)])


def test_read_json_is_the_shared_reader(tmp_path):
    """Every failure of the one JSON helper is a ModelError naming the file."""
    for name, data in [("digits.json", f"[{HUGE}]".encode()), ("deep.json", b"[" * 100000 + b"]" * 100000),
                       ("bytes.json", b'{"a": "\xff"}'), ("broken.json", b"{")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match=rf"{name}: "):
            read_json(tmp_path / name, "", want=None)


# ---- 8: sizes that would allocate without end ------------------------------------------------------------------
def test_canvas_beyond_memory_is_refused_at_load(engines, capsys):
    """dims.seq_len.max and max_sequence_length of 10**6: the server's warm-up would allocate caches and a
    refresh pass's attention (terabytes) and end in a MemoryError; the load refuses with the number instead."""
    raw = json.loads((engines / "manifest.json").read_text())
    raw["model"]["max_sequence_length"] = 10**6
    for dim in ("seq_len", "n_tokens", "n_hidden"):
        raw["dims"][dim]["max"] = 10**6
    (engines / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"manifest.json: a canvas of 1000000 positions .* needs at least [0-9.e+]+ "
                                         r"GiB of memory \(\d+ bytes\), more than the .* this machine has"):
        load_manifest(engines)
    assert "re-export with a smaller --max-len" in one_line_error(capsys, ["check", str(engines)])


def test_memory_check_compares_with_the_machine(engines, monkeypatch):
    m = load_manifest(engines)
    need = memory.canvas_bytes(m.config, "fp32", len(m.layer_ranges), 320)
    assert need == (3 * 4 + 2 + 1) * 320 * 64 * 4 + 4 * 320 * 320 * 4   # K/V/Q per layer, boundaries, attention
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: need - 1)
    with pytest.raises(ModelError, match=rf"needs at least .* \({need} bytes\)"):
        load_manifest(engines)
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: need)
    load_manifest(engines)
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: None)   # unknown: nothing refused
    load_manifest(engines)


def test_machine_memory_reads_cgroup_limits(tmp_path):
    (tmp_path / "memory.max").write_text("1048576\n")
    assert memory.machine_memory_bytes(tmp_path) == 1 << 20
    (tmp_path / "memory.max").write_text("max\n")
    unlimited = memory.machine_memory_bytes(tmp_path)
    assert unlimited is None or unlimited > 1 << 20
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("2097152\n")
    assert memory.machine_memory_bytes(tmp_path) == 2 << 20


@pytest.mark.parametrize("key,value", [("n_layers", 10**9), ("d_model", 2**40), ("max_sequence_length", 10**30),
                                       ("vocab_size", 2**31)])
def test_config_sizes_are_bounded_before_anything_is_sized(ckpt, key, value):
    """n_layers 10**9 used to spend 10-25 s building per-layer tables before a MemoryError."""
    edit_json(ckpt / "config.json", **{key: value})
    with pytest.raises(ModelError, match=rf"config.json: {key}=\d+ is beyond any LLaDA model"):
        load_config(ckpt)


def test_manifest_model_sizes_are_bounded(tiny_engines):
    raw = json.loads((tiny_engines / "manifest.json").read_text())["model"]
    with pytest.raises(ModelError, match=r"n_layers=1000000000 is beyond any LLaDA model"):
        config_from_manifest({**raw, "n_layers": 10**9}, tiny_engines / "manifest.json")


def test_config_declaring_more_weights_than_the_files_hold(ckpt):
    edit_json(ckpt / "config.json", n_layers=4000)
    with pytest.raises(ModelError, match=r"config.json: its sizes make \d+ parameters, more than the \d+ bytes"):
        Checkpoint(ckpt)


# ---- 12: broken files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", [("embed", "head"), ("layers_00_02", "layers_02_04"), ("embed", "layers_00_02")])
def test_swapped_piece_files_are_refused(engines, a, b):
    raw = json.loads((engines / "manifest.json").read_text())
    pa, pb = (next(p for p in raw["pieces"] if p["name"] == n) for n in (a, b))
    for key in ("file", "sha256"):   # hashes updated: only the graphs' inputs and outputs can tell
        pa[key], pb[key] = pb[key], pa[key]
    (engines / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=rf"the graph lacks input '.*', which manifest.json lists for piece {a}; "
                                         r"the graph files were swapped"):
        load_manifest(engines)


@pytest.mark.parametrize("key,value", [("n_heads", 8), ("d_model", 128)])
def test_manifest_sizes_disagreeing_with_the_graphs(engines, key, value):
    """A manifest rewritten consistently for other sizes (pieces included) still disagrees with the graphs."""
    raw = json.loads((engines / "manifest.json").read_text())
    raw["model"][key] = value
    cfg = ModelConfig.from_dict(raw["model"])
    for p, spec in zip(raw["pieces"], piece_specs(cfg, [tuple(r) for r in raw["layer_ranges"]], raw["dtype"])):
        p["inputs"], p["outputs"] = [asdict(t) for t in spec.inputs], [asdict(t) for t in spec.outputs]
    (engines / "manifest.json").write_text(json.dumps(raw))
    message = {"d_model": r"embed.onnx: output 'hidden_states' is float32 \['batch', 'n_tokens', 64\] in the graph, "
                          r"but manifest.json says float32 \['batch', 'n_tokens', 128\]",
               "n_heads": r"layers_00_02.onnx: input 'past_key_values.0.key' is float32 \['batch', 4, 'seq_len', "
                          r"16\] in the graph, but manifest.json says float32 \['batch', 8, 'seq_len', 8\]"}[key]
    with pytest.raises(ModelError, match=message):
        load_manifest(engines)


def test_graph_io_reader_agrees_with_onnx(tiny_engines):
    from dllm_trt.runtime.manifest import graph_io

    onnx = pytest.importorskip("onnx")
    for name in ("embed.onnx", "layers_00_02.onnx", "layers_02_04.onnx", "head.onnx"):
        model = onnx.load(str(tiny_engines / name), load_external_data=False)
        want = [[(v.name, v.type.tensor_type.elem_type,
                  [d.dim_param if d.HasField("dim_param") else d.dim_value for d in v.type.tensor_type.shape.dim])
                 for v in side] for side in (model.graph.input, model.graph.output)]
        got = graph_io((tiny_engines / name).read_bytes(), tiny_engines / name)
        assert [list(side) for side in got] == want


def test_overlapping_safetensors_tensors(ckpt):
    def overlap(header):
        a, b = sorted(k for k in header if k.endswith("attn_norm.weight"))[:2]
        header[b]["data_offsets"] = header[a]["data_offsets"]
    edit_header(ckpt / "model-00001-of-00002.safetensors", overlap)
    with pytest.raises(ModelError, match=r"model-00001-of-00002.safetensors: tensors '.*' and '.*' overlap"):
        Checkpoint(ckpt)


def test_safetensors_with_a_gap_between_tensors(ckpt):
    """A tensor shrunk to half its bytes (F32 -> F16 in place): offsets and shape agree, but the library's own
    reader refuses the gap it leaves, with a traceback, when the tensor is read."""
    def shrink(header):
        key = next(k for k in header if k.endswith("attn_norm.weight"))
        begin, end = header[key]["data_offsets"]
        header[key]["dtype"], header[key]["data_offsets"] = "F16", [begin, begin + (end - begin) // 2]
    edit_header(ckpt / "model-00001-of-00002.safetensors", shrink)
    with pytest.raises(ModelError, match=r"leave a gap between them"):
        Checkpoint(ckpt)


def test_safetensors_header_naming_a_tensor_twice(ckpt):
    path = ckpt / "model-00001-of-00002.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    twice = json.dumps(header)[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}"
    path.write_bytes(len(twice).to_bytes(8, "little") + twice.encode() + data[8 + n:])
    with pytest.raises(ModelError, match="appears twice"):
        Checkpoint(ckpt)


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_integer_weights_are_refused(ckpt, dtype):
    """The same bytes read as integers used to export a garbage model without a word."""
    def retype(header):
        key = next(k for k in header if k.endswith("q_proj.weight"))
        header[key]["dtype"] = dtype   # same item size: offsets and shape stay consistent
    edit_header(ckpt / "model-00001-of-00002.safetensors", retype)
    with pytest.raises(ModelError, match=rf"q_proj.weight' is stored as {dtype}; LLaDA weights are floating point"):
        Checkpoint(ckpt)


@pytest.mark.parametrize("source", [5, None, ["a"], ""])
def test_check_needs_a_string_source(engines, capsys, source):
    raw = edit_json(engines / "manifest.json")
    if source is None:
        raw["export"].pop("source")
    else:
        raw["export"]["source"] = source
    (engines / "manifest.json").write_text(json.dumps(raw))
    assert "export.source is" in one_line_error(capsys, ["check", str(engines)])


@pytest.mark.parametrize("changes", [{"model_type": "llama"}, {"model_type": "lladamoe"}, {"model_type": 3},
                                     {"architectures": ["LlamaForCausalLM"]}, {"architectures": "LLaDAModelLM"}])
def test_checkpoint_of_another_architecture(ckpt, changes):
    edit_json(ckpt / "config.json", **changes)
    with pytest.raises(ModelError, match=r"config.json: (model_type|architectures) .* is not LLaDA"):
        load_config(ckpt)


def test_check_against_a_checkpoint_of_other_sizes(tiny_engines, tmp_path, capsys):
    from dllm_trt.export.checkpoint_writer import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=2, d_model=32)
    err = one_line_error(capsys, ["check", str(tiny_engines), "--model", str(other)])
    assert "not the checkpoint" in err and "d_model=32, the engine has d_model=64" in err


def test_checkpoint_load_memory_from_declared_sizes(tiny_dir, monkeypatch):
    """For a backend that loads the checkpoint whole (the torch backend): the weights' memory from config.json's
    sizes, against the machine's."""
    from dllm_trt.runtime.checkpoint import expected_shapes, parameter_count

    ckpt = Checkpoint(tiny_dir)
    n = parameter_count(ckpt.config)
    assert n == sum(math.prod(s) for s in expected_shapes(ckpt.config).values())
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: 4 * n - 1)
    with pytest.raises(ModelError, match=rf"loading its {n} parameters at 4 bytes each needs at least"):
        ckpt.require_memory(4)
    ckpt.require_memory(2)
