"""Engine folders: manifests are validated, files stay inside the folder, data files are hashed (once per file
version), and every problem is one ModelError line."""
import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest

from dllm_trt.runtime import manifest as manifest_module
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import load_manifest, onnx_external_locations, sha256_file


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return tiny_engines


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLM_TRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(manifest_module, "_IN_MEMORY", {})
    return tmp_path / "cache"


@pytest.fixture
def eng(engines, tmp_path):
    return shutil.copytree(engines, tmp_path / "eng")


def edit_manifest(d, change):
    raw = json.loads((d / "manifest.json").read_text())
    change(raw)
    (d / "manifest.json").write_text(json.dumps(raw))


def test_manifest_carries_end_tokens(engines):
    assert load_manifest(engines).config.end_token_ids == (256, 261)
    assert json.loads((engines / "manifest.json").read_text())["model"]["end_token_ids"] == [256, 261]


def test_manifest_records_the_bucket_shapes(engines):
    from dllm_trt.runtime import buckets

    raw = json.loads((engines / "manifest.json").read_text())
    entry = raw["export"]["buckets"]
    max_active = raw["profiles"]["window"]["rows"]["max"]
    assert entry == buckets.manifest_entry(raw["dims"]["seq_len"]["max"], max_active)
    assert entry["rows"][-1] == max_active


def test_external_locations_match_onnx(engines):
    for f in engines.glob("*.onnx"):
        graph = onnx.load(str(f), load_external_data=False).graph
        want = [e.value for t in graph.initializer for e in t.external_data if e.key == "location"]
        assert want and onnx_external_locations(f.read_bytes(), f) == want


def test_external_locations_inside_nodes_and_subgraphs_are_found():
    """External data may also sit in a Constant node's tensor or in a subgraph's initializer: the reader must see
    those locations too (an independent walk with onnx says where they are)."""
    from onnx import TensorProto, helper

    def external(name, location):
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        return t

    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                               initializer=[external("w", "in_subgraph.bin")])
    nodes = [helper.make_node("Constant", [], ["c"], value=external("c", "in_constant.bin")),
             helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
                              initializer=[external("init", "in_graph.bin")])
    data = helper.make_model(graph).SerializeToString()
    found = onnx_external_locations(data, "m.onnx")
    assert sorted(found) == ["in_constant.bin", "in_graph.bin", "in_subgraph.bin", "in_subgraph.bin"]


# ---- corrupt manifests: one line each --------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (lambda m: m["dims"].pop("seq_len"), r"dims must name exactly"),
    (lambda m: m.update(dims="x"), r"dims must name exactly"),
    (lambda m: m["dims"].update(seq_len={"min": 2, "max": "48"}), r"dims.seq_len must be"),
    (lambda m: m.update(pieces=[]), r"pieces must be a non-empty list"),
    (lambda m: m.update(pieces={}), r"pieces must be a non-empty list"),
    (lambda m: m["pieces"][0].update(inputs=5), r"pieces\[0\].inputs must be list"),
    (lambda m: m["pieces"][0].pop("sha256"), r"pieces\[0\] has no 'sha256'"),
    (lambda m: m["pieces"][1].update(data_size="12"), r"pieces\[1\].data_size must be int"),
    (lambda m: m["pieces"].pop(1), r"pieces do not match the model and layer ranges"),
    (lambda m: m["pieces"][1]["inputs"][0].update(name="x"), r"first difference: layers_00_02"),
    (lambda m: m["model"].update(d_model="64"), r"key 'd_model' must be a positive integer"),
    (lambda m: m["model"].update(n_heads=0), r"key 'n_heads' must be a positive integer"),
    (lambda m: m["model"].update(end_token_ids=[999]), r"end_token_ids \[999\] must start with eos_token_id"),
    (lambda m: m.update(model=[]), r"'model' must be an object"),
    (lambda m: m.update(dtype="fp8"), r"dtype must be one of"),
    (lambda m: m.update(layer_ranges=[[0, 2]]), r"layer_ranges must split 0..4"),
    (lambda m: m.update(tokenizer_files="tokenizer.json"), r"tokenizer_files must be a list"),
])
def test_corrupt_manifest(eng, change, message):
    edit_manifest(eng, change)
    with pytest.raises(ModelError, match=r"manifest.json: .*" + message):
        load_manifest(eng)


@pytest.mark.parametrize("content,message", [(b"[1]", "must hold a JSON object, got list"),
                                             (b'{"format": "\xff"}', "not UTF-8 text"),
                                             (b'{"format": ', "not valid JSON")])
def test_unreadable_manifest(eng, content, message):
    (eng / "manifest.json").write_bytes(content)
    with pytest.raises(ModelError, match=message):
        load_manifest(eng)


def test_corrupt_manifest_on_the_command_line(eng):
    edit_manifest(eng, lambda m: m.update(pieces=[]))
    proc = subprocess.run([sys.executable, "-m", "dllm_trt.cli", "generate", "--engines", str(eng), "--prompt", "Hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dllm-trt: error: ")


# ---- files stay inside the folder ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["file", "data_file"])
@pytest.mark.parametrize("name", ["/etc/passwd", "../eng/head.onnx", "sub/../../x"])
def test_piece_paths_outside_the_folder(eng, key, name):
    edit_manifest(eng, lambda m: m["pieces"][-1].update({key: name}))
    with pytest.raises(ModelError, match=r"must be a plain path inside the folder"):
        load_manifest(eng)


def test_piece_symlink_outside_the_folder(eng, tmp_path):
    shutil.copy(eng / "head.onnx.data", tmp_path / "outside.data")
    (eng / "head.onnx.data").unlink()
    (eng / "head.onnx.data").symlink_to(tmp_path / "outside.data")
    with pytest.raises(ModelError, match=r"data file of piece head 'head.onnx.data' leads outside the folder"):
        load_manifest(eng)


def test_tokenizer_file_outside_the_folder(eng):
    edit_manifest(eng, lambda m: m["tokenizer_files"].append("../../tokenizer.json"))
    with pytest.raises(ModelError, match=r"tokenizer file '../../tokenizer.json' must be a plain path"):
        load_manifest(eng)


def test_unlisted_tokenizer_symlink_outside_the_folder(eng, tmp_path):
    edit_manifest(eng, lambda m: m.update(tokenizer_files=[]))
    shutil.copy(eng / "tokenizer.json", tmp_path / "tokenizer.json")
    (eng / "tokenizer.json").unlink()
    (eng / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(ModelError, match=r"tokenizer file 'tokenizer.json' leads outside the folder"):
        load_manifest(eng)


def relocate_external_data(eng, location):
    """Point head.onnx's external tensors at `location` and record the new graph hash in the manifest."""
    model = onnx.load(str(eng / "head.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(eng / "head.onnx"))
    edit_manifest(eng, lambda m: m["pieces"][-1].update(sha256=sha256_file(eng / "head.onnx")))


def test_onnx_external_data_outside_the_folder(eng, tmp_path):
    shutil.copy(eng / "head.onnx.data", tmp_path / "head.onnx.data")
    relocate_external_data(eng, "../head.onnx.data")
    with pytest.raises(ModelError, match=r"external data of head.onnx '../head.onnx.data' must be a plain path"):
        load_manifest(eng)


def test_onnx_external_data_not_listed_in_the_manifest(eng):
    shutil.copy(eng / "head.onnx.data", eng / "other.data")
    relocate_external_data(eng, "other.data")
    with pytest.raises(ModelError, match=r"head.onnx: its weights are read from 'other.data', which manifest.json "
                                         r"does not list"):
        load_manifest(eng)


# ---- data file integrity ---------------------------------------------------------------------------------------
def scribble(path):
    """Random bytes over the first half of a file; the size stays the same."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(os.urandom(size // 2))


def test_overwritten_data_file_is_refused(eng):
    scribble(eng / "layers_00_02.onnx.data")
    with pytest.raises(ModelError, match=r"layers_00_02.onnx.data: weights do not match manifest.json "
                                         r"\(sha256 differs"):
        load_manifest(eng)


def count_hashes(monkeypatch):
    calls = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p, *a: calls.append(p.name) or real(p, *a))
    return calls


def test_verified_data_files_are_remembered(eng, cache_dir, monkeypatch):
    calls = count_hashes(monkeypatch)
    load_manifest(eng)
    assert sorted(calls) == ["embed.onnx.data", "head.onnx.data", "layers_00_02.onnx.data",
                            "layers_02_04.onnx.data"]
    assert (cache_dir / "verified.json").is_file()
    monkeypatch.setattr(manifest_module, "_IN_MEMORY", {})  # as a new process would: only the cache file
    calls.clear()
    load_manifest(eng)
    assert calls == []
    load_manifest(eng, verify_data=True)  # dllm-trt check: always
    assert len(calls) == 4
    calls.clear()
    data = eng / "head.onnx.data"
    st = data.stat()
    scribble(data)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the ctime still changed
    with pytest.raises(ModelError, match=r"head.onnx.data: weights do not match"):
        load_manifest(eng)
    assert calls == ["head.onnx.data"]


def test_unwritable_cache_falls_back_to_memory(eng, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DLLM_TRT_CACHE_DIR", str(tmp_path / "file" / "sub"))
    calls = count_hashes(monkeypatch)
    load_manifest(eng)
    assert len(calls) == 4
    load_manifest(eng)
    assert len(calls) == 4
