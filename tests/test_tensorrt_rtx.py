"""Real TensorRT for RTX plans of the tiny model's pieces, built without a GPU (the parser and builder run on the
CPU), in fp32, bf16 and fp16: one plan per piece, with a window and a refresh profile for each layer range; and, on
a GPU that TensorRT for RTX supports, loading them and decoding token for token like ONNX Runtime. Skips when
tensorrt_rtx is not installed (pip install -e '.[tensorrt-rtx]')."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dllm_trt.export.onnx_export import export_model
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import load_manifest, range_name

if importlib.util.find_spec("tensorrt_rtx") is None:
    pytest.skip("tensorrt_rtx is not installed (pip install -e '.[tensorrt-rtx]')", allow_module_level=True)

from dllm_trt.export.tensorrt_build import build_plans  # noqa: E402
from dllm_trt.runtime.backends.tensorrt_backend import cuda_device  # noqa: E402
from dllm_trt.runtime.trt_plans import gpu_support  # noqa: E402

# one worker runs this module: its module fixtures (exports, builds) run once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_tensorrt_rtx")

_, GPU_NAME, DEVICE_CC = cuda_device()
GPU_OK = DEVICE_CC is not None and gpu_support("rtx", DEVICE_CC)[0]
NEEDS_GPU = pytest.mark.skipif(not GPU_OK, reason=(
    "needs a GPU TensorRT for RTX supports (Ampere..Blackwell RTX); "
    + ("CUDA reports none" if DEVICE_CC is None else f"this one is sm{DEVICE_CC.replace('.', '')}")))
# fp32 keeps two layer ranges (and is the ONNX Runtime reference for the GPU test); bf16/fp16 one range each
LAYERS_PER_RANGE = {"fp32": 2, "bf16": 4, "fp16": 4}


@pytest.fixture(scope="module", params=["fp32", "bf16", "fp16"])
def built(request, tiny_dir, tmp_path_factory):
    """(engine dir, plan dir) of one export per dtype, built once."""
    dtype = request.param
    if dtype == "bf16":   # the session's bf16 export has these settings already
        eng = request.getfixturevalue("tiny_bf16_engines")
    else:
        eng = tmp_path_factory.mktemp(f"rtx-{dtype}") / "tiny"
        export_model(tiny_dir, eng, layers_per_range=LAYERS_PER_RANGE[dtype], dtype=dtype, max_len=64, max_active=32,
                     quiet=True)
    return eng, build_plans(eng, progress=False, flavor="rtx")


def plan_files(eng, out):
    return {p.name: out / f"{p.name}.plan" for p in load_manifest(eng).pieces}


def test_every_piece_has_a_plan(built):
    eng, out = built
    record = json.loads((out / "build.json").read_text())
    m = load_manifest(eng)
    assert record["target"]["flavor"] == "rtx" and record["target"]["precision"] == m.dtype
    assert record["target"]["compute_capability"] == (DEVICE_CC if GPU_OK else "ampere+")
    assert out.parent == eng / "trt" and out.name == record["fingerprint"]
    for name, plan in plan_files(eng, out).items():
        assert plan.stat().st_size > 1000, name
        assert plan.stat().st_size == record["plan_size"][name]
    assert set(record["build_seconds"]) == {p.name for p in m.pieces}
    assert set(plan_files(eng, out)) == {"embed", "head"} | {range_name(*r) for r in m.layer_ranges}


def test_each_range_plan_has_a_window_and_a_refresh_profile(built):
    """The profiles the plans were built with (build.json; reading them back from a plan needs a GPU, which
    test_plans_load_and_decode_like_onnxruntime does): window rows up to max_active, refresh rows a whole canvas."""
    eng, out = built
    m = load_manifest(eng)
    profiles = json.loads((out / "build.json").read_text())["profiles"]
    assert set(profiles) == {p.name for p in m.pieces}
    window, refresh = m.profiles["window"]["rows"], m.profiles["refresh"]["rows"]
    for p in m.pieces:
        if p.kind != "layers":
            assert list(profiles[p.name]) == ["all"], p.name
            continue
        assert list(profiles[p.name]) == ["window", "refresh"], p.name
        assert profiles[p.name]["window"]["rows"] == [window["min"], min(32, window["max"]), window["max"]]
        assert profiles[p.name]["refresh"]["rows"] == [refresh["min"], refresh["max"], refresh["max"]]
        for mode in ("window", "refresh"):
            assert profiles[p.name][mode]["batch"] == [1, 1, m.dims["batch"]["max"]]
            assert profiles[p.name][mode]["seq_len"][2] == m.dims["seq_len"]["max"]


def test_second_build_is_a_noop(built, capsys):
    eng, out = built
    before = {n: p.stat().st_mtime_ns for n, p in plan_files(eng, out).items()}
    assert build_plans(eng, progress=False, flavor="rtx") == out
    assert "up to date" in capsys.readouterr().err
    assert {n: p.stat().st_mtime_ns for n, p in plan_files(eng, out).items()} == before


def test_truncated_or_foreign_plan_is_rebuilt(built, capsys):
    eng, out = built
    plans = plan_files(eng, out)
    head, embed = plans["head"], plans["embed"]
    size = head.stat().st_size
    others = {n: p.stat().st_mtime_ns for n, p in plans.items() if n != "head"}
    head.write_bytes(head.read_bytes()[: size // 2])                 # truncated
    build_plans(eng, progress=False, flavor="rtx")
    assert head.stat().st_size == size
    assert f"building 1 of {len(plans)}" in capsys.readouterr().err
    assert {n: p.stat().st_mtime_ns for n, p in plans.items() if n != "head"} == others   # only head rebuilt
    embed_size = embed.stat().st_size
    embed.write_bytes(head.read_bytes())                              # another piece's plan in its place
    build_plans(eng, progress=False, flavor="rtx")
    assert embed.stat().st_size == embed_size


def test_swapped_plan_of_the_same_size_is_refused_at_load(built):
    """Sizes cannot tell same-shaped ranges apart; the recorded sha256, checked when loading, does."""
    import hashlib
    import shutil

    from dllm_trt.runtime.backends.base import BackendError
    from dllm_trt.runtime.backends.tensorrt_backend import load_plan

    eng, out = built
    record = json.loads((out / "build.json").read_text())
    plans = plan_files(eng, out)
    assert record["plan_sha256"] == {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in plans.items()}
    ranges = [range_name(*r) for r in load_manifest(eng).layer_ranges]
    if len(ranges) < 2:
        pytest.skip("one layer range in this export")
    a, b = plans[ranges[0]], plans[ranges[1]]
    saved = a.read_bytes()
    shutil.copyfile(b, a)
    try:
        with pytest.raises(BackendError, match="is not the plan that was built there"):
            load_plan(None, None, a, "rtx", record["plan_sha256"][ranges[0]])  # refused before TensorRT sees it
    finally:
        a.write_bytes(saved)


def test_explicit_targets(built):
    eng, _ = built
    out = build_plans(eng, progress=False, flavor="rtx", target_cc="12.0,8.6")
    assert out.name.startswith("sm86_sm120-rtx")
    assert all(p.stat().st_size > 1000 for p in plan_files(eng, out).values())
    for bad, why in (("7.5", "no fp32 matrix multiplies on Turing"), ("9.0", "TensorRT for RTX builds for 8.0")):
        with pytest.raises(ModelError, match=why):
            build_plans(eng, progress=False, flavor="rtx", target_cc=bad)


def cli(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # as on a machine without a GPU
    return subprocess.run([sys.executable, "-m", "dllm_trt.cli", *args], capture_output=True, text=True, env=env)


def test_cli_without_gpu(built):
    eng, _ = built
    if load_manifest(eng).dtype != "fp32":
        pytest.skip("one export is enough for the CLI")
    build = cli("build", str(eng), "--precision", "fp32")
    assert build.returncode == 0 and "up to date" in build.stderr
    doctor = cli("doctor")
    assert doctor.returncode == 0 and "tensorrt: build only (TensorRT for RTX" in doctor.stdout
    run = cli("generate", "--engines", str(eng), "--backend", "tensorrt", "--prompt", "Hi")
    assert run.returncode == 2 and "CUDA reports none" in run.stderr and "Traceback" not in run.stderr
    auto = cli("generate", "--engines", str(eng), "--prompt", "Hi", "--gen-length", "8", "--json")
    assert auto.returncode == 0 and '"onnxruntime (cpu' in auto.stdout   # plans exist, no GPU: ONNX Runtime


@NEEDS_GPU
def test_plans_load_and_decode_like_onnxruntime(built):
    """Token for token against ONNX Runtime on the same fp32 export, every cache policy."""
    from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dllm_trt.runtime.backends.tensorrt_backend import TensorRTBackend
    from fake_tensorrt import assert_decodes_like

    eng, _ = built
    trt = TensorRTBackend(eng, flavor="rtx")
    assert trt.describe().startswith("tensorrt-rtx")
    m = load_manifest(eng)
    for r in range(len(m.layer_ranges)):   # the plan's own profiles: hidden_states rows per mode
        engine = trt.engines[m.range_piece(r).name]
        rows = [[shape[1] for shape in engine.get_tensor_profile_shape("hidden_states", i)] for i in range(2)]
        n = m.dims["seq_len"]["max"]
        assert rows == [[1, min(32, m.max_active), m.max_active], [2, n, n]]
    if load_manifest(eng).dtype != "fp32":
        return  # bf16/fp16: loading and running is the check; token parity is asked of fp32 only
    ort = OnnxRuntimeBackend(eng, threads=1)
    assert_decodes_like(trt, ort, gen=24, prompts=5, prompt_lengths=(4, 20))
