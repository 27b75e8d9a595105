"""TensorRT-independent logic of the TensorRT path (profiles, fingerprints, plan cache decisions), plus the
behaviour without TensorRT: clean imports, doctor, and clear errors."""
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from dllm_trt.export.onnx_export import export_model
from dllm_trt.runtime.manifest import load_manifest
from dllm_trt.runtime.trt_plans import (Target, cache_bytes, check_precision, dim_ranges, plan_dir, plan_status,
                                        profile_for, write_record)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def engines(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "tiny"
    export_model(tiny_dir, out, layers_per_range=2, max_len=128, max_active=32, quiet=True)
    return out


@pytest.fixture
def target():
    return Target("NVIDIA H100 80GB HBM3", "9.0", "11.4.0", "fp32", 128, 32)


def test_profiles_tie_shared_dims(engines):
    m = load_manifest(engines)
    ranges = dim_ranges(m)
    assert ranges["seq_len"] == (2, 128, 128) and ranges["active_len"] == (1, 32, 32)
    prof = profile_for(m.piece("layers_00_02.window"), ranges)
    # every input that uses seq_len gets the same (min, opt, max) on that axis
    seq_axes = {name: [s[1] for s in shapes] for name, shapes in prof.items() if name.startswith("past_key_values")}
    assert len({tuple(v) for v in seq_axes.values()}) == 1
    assert prof["hidden_states"] == ((1, 64), (32, 64), (32, 64))
    assert prof["past_key_values.0.key"] == ((4, 2, 16), (4, 128, 16), (4, 128, 16))
    assert prof["key_is_mask"] == ((2,), (128,), (128,))


def test_profiles_clip_to_requested_maxima(engines):
    m = load_manifest(engines)
    ranges = dim_ranges(m, max_len=64, max_active=16)
    assert ranges["seq_len"] == (2, 64, 64) and ranges["window_len"] == (1, 16, 16)
    with pytest.raises(ValueError, match="outside the exported range"):
        dim_ranges(m, max_len=4096)


def test_precision_must_match_export(engines):
    m = load_manifest(engines)
    check_precision(m, "fp32")
    with pytest.raises(ValueError, match="needs an export with --dtype bf16"):
        check_precision(m, "bf16")


def test_fingerprint_covers_gpu_trt_precision_and_profiles(target):
    fp = target.fingerprint()
    assert fp.startswith("sm90-trt11.4.0-fp32-")
    for change in ({"gpu_name": "NVIDIA H200"}, {"compute_capability": "8.9"}, {"trt_version": "10.13.0"},
                   {"precision": "bf16"}, {"max_len": 256}, {"max_active": 64}, {"opt_level": 5}):
        assert replace(target, **change).fingerprint() != fp, change
    assert replace(target).fingerprint() == fp


def fake_build(engines, manifest, target):
    d = plan_dir(engines, target)
    d.mkdir(parents=True, exist_ok=True)
    for p in manifest.pieces:
        (d / f"{p.name}.plan").write_bytes(b"plan:" + p.name.encode())
    write_record(engines, manifest, target)


def test_plan_cache_decisions(engines, target, tmp_path):
    eng = shutil.copytree(engines, tmp_path / "e")
    m = load_manifest(eng)
    assert plan_status(eng, m, target)[0] == "build"
    fake_build(eng, m, target)
    assert plan_status(eng, m, target) == ("ok", "")                    # built once: reused
    other_gpu = replace(target, gpu_name="NVIDIA H200", compute_capability="9.0")
    assert plan_status(eng, m, other_gpu)[0] == "build"                  # another GPU: its own folder
    d = plan_dir(eng, target)
    (d / "head.plan").write_bytes(b"x")                                   # truncated plan
    assert plan_status(eng, m, target) == ("build", f"{d / 'head.plan'} is missing or incomplete")
    fake_build(eng, m, target)
    record = json.loads((d / "build.json").read_text())
    record["target"]["trt_version"] = "10.0.0"                            # a record copied from elsewhere
    (d / "build.json").write_text(json.dumps(record))
    assert "another target" in plan_status(eng, m, target)[1]
    fake_build(eng, m, target)
    m.pieces[0].sha256 = "0" * 64                                         # the ONNX file changed since
    assert "changed since its plan was built" in plan_status(eng, m, target)[1]


def test_runtime_finds_plans_built_with_other_limits(engines, target, tmp_path):
    from dllm_trt.runtime.trt_plans import find_built

    eng = shutil.copytree(engines, tmp_path / "e")
    m = load_manifest(eng)
    key = (target.gpu_name, target.compute_capability, target.trt_version, target.precision)
    assert find_built(eng, m, *key) is None
    small = replace(target, max_len=64, max_active=16, opt_level=1)   # built with --max-len 64 --max-active 16
    fake_build(eng, m, small)
    assert find_built(eng, m, *key) == small
    assert find_built(eng, m, "NVIDIA H200", "9.0", "11.4.0", "fp32") is None    # another GPU
    assert find_built(eng, m, *key[:3], "bf16") is None                           # another precision
    m.pieces[1].sha256 = "f" * 64                                                  # sources changed since
    assert find_built(eng, m, *key) is None


def test_cache_bytes_for_llada_8b_shape(engines):
    m = load_manifest(engines)
    m.config = replace(m.config, d_model=4096, n_heads=32, n_layers=32)
    m.layer_ranges = [[i, i + 1] for i in range(32)]
    sizes = cache_bytes(m, 512, 2)
    assert sizes["kvq"] == 3 * 32 * 32 * 512 * 128 * 2    # 384 MiB of K/V/Q for a 512-slot canvas in bf16
    assert sizes["hidden"] == 33 * 512 * 4096 * 2


@pytest.mark.skipif(HAS_TRT, reason="checks the behaviour without TensorRT")
def test_without_tensorrt(engines):
    import dllm_trt.runtime.backends.tensorrt_backend  # imports cleanly without TensorRT  # noqa: F401

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dllm_trt.cli", *args], capture_output=True, text=True)

    doctor = cli("doctor")
    assert doctor.returncode == 0 and "tensorrt: no (not installed" in doctor.stdout
    build = cli("build", str(engines))
    assert build.returncode == 2 and "TensorRT is not installed" in build.stderr and "Traceback" not in build.stderr
    run = cli("generate", "--engines", str(engines), "--backend", "tensorrt", "--prompt", "Hi")
    assert run.returncode == 2 and "TensorRT is not installed" in run.stderr
    auto = cli("generate", "--engines", str(engines), "--prompt", "Hi", "--gen-length", "8", "--json")
    assert auto.returncode == 0 and '"onnxruntime (cpu' in auto.stdout   # auto falls back to ONNX Runtime


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed here (it is not available in this workplace)")
def test_tensorrt_build_and_generate(engines):
    from dllm_trt.runtime.backends.tensorrt_backend import TensorRTBackend, build_plans

    build_plans(engines, precision="fp32", progress=False)
    assert TensorRTBackend(engines).describe().startswith("tensorrt")
