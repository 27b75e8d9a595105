"""Export works for any valid head count and depth: tracing sizes never collide with the model's static sizes.
Each tiny engine is checked once against the PyTorch reference on ONNX Runtime (dllm-trt check)."""
import itertools
import json
import shutil
import subprocess
import sys

import onnx
import pytest

from dllm_trt.export.check import check_engines
from dllm_trt.export.checkpoint_writer import write_tiny_checkpoint
from dllm_trt.export.onnx_export import example_sizes, export_model
from dllm_trt.export.out_folder import export_into
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import dims_for, load_manifest

# one worker runs this module: its module fixtures (exports, builds) run once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_export_configs")

# (n_heads, d_model, n_layers, layers_per_range, max_len, max_active): 1, 2, 3 and 5 heads; 1..5 layers; ranges
# of 1..4 layers; the first is smaller than the sizes dllm-trt check prefers
CONFIGS = [(1, 8, 1, 1, 20, 6), (2, 16, 2, 2, 64, 16), (3, 96, 5, 3, 64, 16), (5, 40, 4, 4, 64, 16)]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: "heads{}_d{}_layers{}_per{}_len{}_active{}".format(*c))
def exported(request, tmp_path_factory):
    heads, d_model, layers, per_range, max_len, max_active = request.param
    root = tmp_path_factory.mktemp("cfg")
    model = write_tiny_checkpoint(root / "model", seed=3, n_layers=layers, d_model=d_model, n_heads=heads, max_len=64)
    export_model(model, root / "eng", layers_per_range=per_range, max_len=max_len, max_active=max_active, quiet=True)
    return root / "eng", request.param


def test_exported_engine_matches_the_reference(exported):
    eng, (heads, d_model, layers, per_range, _, _) = exported
    m = load_manifest(eng)
    assert (m.config.n_heads, m.config.d_model, m.config.n_layers) == (heads, d_model, layers)
    assert len(m.layer_ranges) == -(-layers // per_range)
    rows = check_engines(eng)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_dynamic_dims_stay_symbolic(exported):
    eng, _ = exported
    m = load_manifest(eng)
    for spec in m.pieces:
        graph = onnx.load(str(eng / spec.file), load_external_data=False).graph
        for t, value in zip(spec.inputs, graph.input):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == t.shape, (spec.name, t.name, dims)


WINDOW = {"batch", "seq_len", "rows", "track_len", "window_len"}
PIECE_DIMS = [WINDOW, {"batch", "n_tokens"}, {"batch", "n_hidden", "n_rows"}]


def test_example_sizes_search_upwards_past_static_sizes():
    # 3 heads of 32: the preferred track_len 3 and every size below it are taken (4 by the batch)
    sizes = example_sizes(dims_for(256, 256), {2, 96, 3, 32, 16}, WINDOW)
    assert sizes["batch"] == 4 and sizes["track_len"] == 5 and len(set(sizes.values())) == 5


def test_example_sizes_are_distinct_in_range_and_unlike_static_sizes():
    # one test over every combination (168): each is a few microseconds, a test case each would cost more to schedule
    for heads, head_dim, max_len, max_active in itertools.product([1, 2, 3, 5, 7, 13], [2, 4, 8, 32], [16, 40, 256],
                                                                  [8, 16, 64]):
        if max_active > max_len:
            continue
        static = {2, heads, head_dim, head_dim // 2, heads * head_dim}
        dims = dims_for(max_len, max_active)
        for names in PIECE_DIMS:
            sizes = example_sizes(dims, static, names)
            case = (heads, head_dim, max_len, max_active, sorted(names))
            assert set(sizes) == names and len(set(sizes.values())) == len(sizes), case
            assert not set(sizes.values()) & static, case
            assert all(2 <= v <= dims[n]["max"] for n, v in sizes.items()), case


def test_example_sizes_refuse_impossible_ranges():
    with pytest.raises(ModelError, match="too small to export"):
        example_sizes(dims_for(16, 3), {2, 3}, WINDOW)


# ---- the output folder is checked before any work ----------------------------------------------------------------
def test_export_onto_an_existing_file(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ModelError, match=r"taken: exists and is not a folder"):
        export_model(tmp_path / "no-such-model", tmp_path / "taken", quiet=True)
    with pytest.raises(ModelError, match=r"cannot create the output folder \(.*taken is not a folder\)"):
        export_model(tmp_path / "no-such-model", tmp_path / "taken" / "sub" / "eng", quiet=True)


def test_automatic_export_onto_an_existing_file(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ModelError, match=r"taken: exists and is not a folder"):
        export_into(tmp_path / "no-such-model", tmp_path / "taken")
    assert not (tmp_path / "taken.partial").exists()


def test_export_into_an_unwritable_place(tmp_path, tiny_dir):
    with pytest.raises(ModelError, match=r"cannot create the output folder"):
        export_model(tiny_dir, "/proc/dllm-trt-test/eng", quiet=True)


def test_export_onto_a_file_on_the_command_line(tmp_path):
    (tmp_path / "taken").write_text("")
    proc = subprocess.run([sys.executable, "-m", "dllm_trt.cli", "export", "--model", str(tmp_path / "m"),
                           "--out", str(tmp_path / "taken")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"dllm-trt: error: {tmp_path / 'taken'}: exists and is not a " \
                                                   f"folder; choose a new --out"


def test_export_onto_a_folder_with_files(tmp_path, tiny_dir, tiny_engines, capsys):
    """--out may be new, empty, or an engine folder (replaced as a whole); never a folder with other files."""
    from dllm_trt.cli import main

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "note.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", str(tiny_dir), "--out", str(tmp_path / "docs")])
    assert exc.value.code == 2 and "is not empty and holds no engines" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "docs").iterdir()] == ["note.txt"]
    with pytest.raises(ModelError, match="is not empty"):
        export_model(tiny_dir, tmp_path / "docs", quiet=True)

    from dllm_trt.export.checkpoint_writer import byte_tokenizer, random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(n_layers=2, d_model=32, n_heads=2, max_len=32)
    small = write_checkpoint(tmp_path / "small", cfg, random_weights(cfg, 1), byte_tokenizer())
    out = tmp_path / "eng"
    shutil.copytree(tiny_engines, out)   # an earlier export there, of other layer ranges (layers_00_02, layers_02_04)
    main(["export", "--model", str(small), "--out", str(out), "--layers-per-range", "1"])
    listed = {f for p in json.loads((out / "manifest.json").read_text())["pieces"] for f in (p["file"], p["data_file"])}
    on_disk = {f.name for f in out.glob("*.onnx*")}
    assert "layers_00_01.onnx" in listed and not (out / "layers_02_04.onnx").exists()
    assert on_disk == listed - {""}   # no pieces of the earlier export left behind
    assert not (tmp_path / "eng.partial").exists()
