"""TensorRT-independent logic of the TensorRT path (flavour choice, GPU support, RTX targets, profiles,
fingerprints, plan cache decisions), plus the behaviour without TensorRT: clean imports, doctor, and clear errors."""
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import load_manifest
from dllm_trt.runtime.doctor import tensorrt_usable
from dllm_trt.export.tensorrt_build import (check_buildable, check_precision, dim_ranges, piece_profiles, profile_for,
                                            rtx_targets, write_record)
from dllm_trt.runtime.backends.tensorrt_backend import layer_dims, shape_of
from dllm_trt.runtime.trt_plans import (Target, choose_flavor, find_built, gpu_support, plan_dir,
                                        plan_status, profile_index, stale_pieces)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
# Runs the CLI as if neither TensorRT flavour were installed (find_spec and import both see None).
WITHOUT_TRT = ("import sys; sys.modules['tensorrt'] = sys.modules['tensorrt_rtx'] = None; "
               "from dllm_trt.cli import main; main(sys.argv[1:])")


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return tiny_engines


@pytest.fixture
def target():
    return Target("NVIDIA H100 80GB HBM3", "9.0", "11.4.0", "fp32", 320, 64)


def test_profiles_tie_shared_dims(engines):
    m = load_manifest(engines)
    ranges = dim_ranges(m, mode="window")
    assert ranges["seq_len"] == (2, 320, 320) and ranges["rows"] == (1, 32, 64)  # opt: a typical window pass
    assert ranges["batch"] == (1, 1, 8)                                          # opt: one sequence
    prof = profile_for(m.piece("layers_00_02"), ranges)
    # every input that uses seq_len gets the same (min, opt, max) on that axis
    seq_axes = {name: [s[2] for s in shapes] for name, shapes in prof.items() if name.startswith("past_key_values")}
    assert len({tuple(v) for v in seq_axes.values()}) == 1
    assert prof["hidden_states"] == ((1, 1, 64), (1, 32, 64), (8, 64, 64))
    assert prof["past_key_values.0.key"] == ((1, 4, 2, 16), (1, 4, 320, 16), (8, 4, 320, 16))
    assert prof["key_is_mask"] == ((1, 2), (1, 320), (8, 320))
    assert prof["canvas_lengths"] == ((1,), (1,), (8,))


def test_layer_range_plans_get_a_window_and_a_refresh_profile(engines):
    m = load_manifest(engines)
    profiles = piece_profiles(m, m.range_piece(0))
    assert list(profiles) == ["window", "refresh"]                                # profile index order
    assert profiles["window"]["rows"] == (1, 32, 64)                              # manifest.profiles.window
    assert profiles["refresh"]["rows"] == (2, 320, 320)                           # a query row per canvas slot
    for mode in profiles:                                                         # the rest as manifest.dims
        assert profiles[mode]["seq_len"] == (2, 320, 320) and profiles[mode]["track_len"] == (1, 32, 64)
    assert piece_profiles(m, m.piece("embed")) == {"all": {"batch": (1, 1, 8), "n_tokens": (1, 320, 320)}}
    assert list(piece_profiles(m, m.piece("head"))) == ["all"]
    assert [profile_index("layers", mode) for mode in ("window", "refresh")] == [0, 1]
    assert profile_index("head", "all") == 0
    with pytest.raises(ValueError, match="a head piece has no 'window' profile"):
        profile_index("head", "window")


def test_each_mode_binds_shapes_inside_the_profile_it_selects(engines):
    """What the backend binds per mode (layer_dims) fits the profile profile_index picks, and a refresh over a
    canvas longer than max_active fits only the refresh profile."""
    m = load_manifest(engines)
    piece = m.range_piece(0)
    profiles = [profile_for(piece, r) for r in piece_profiles(m, piece).values()]

    def fits(profile, dims):
        return all(lo <= s <= hi for t in piece.inputs
                   for lo, s, hi in zip(profile[t.name][0], shape_of(t, dims), profile[t.name][2]))

    window = layer_dims("window", 320, 16, n_rows=25, n_track=3)
    refresh = layer_dims("refresh", 320, 16)
    assert refresh["rows"] == refresh["seq_len"] == 320 and refresh["track_len"] == 1
    assert fits(profiles[profile_index("layers", "window")], window)
    assert fits(profiles[profile_index("layers", "refresh")], refresh)
    assert not fits(profiles[profile_index("layers", "window")], refresh)
    assert shape_of(piece.inputs[0], window) == (1, 25, 64)


def test_profiles_clip_to_requested_maxima(engines):
    m = load_manifest(engines)
    ranges = dim_ranges(m, max_len=64, max_active=16)
    assert ranges["seq_len"] == (2, 64, 64) and ranges["window_len"] == (1, 16, 16) and ranges["rows"] == (1, 64, 64)
    assert dim_ranges(m, 64, 16, mode="window")["rows"] == (1, 16, 16)     # a window pass: --max-active
    assert dim_ranges(m, 64, 16, mode="refresh")["rows"] == (2, 64, 64)    # a whole canvas: --max-len
    assert dim_ranges(m, 64, 16)["batch"] == (1, 1, 8)                     # not capped
    assert dim_ranges(m, max_batch=2)["batch"] == (1, 1, 2)               # --max-batch
    with pytest.raises(ValueError, match=r"--max-batch 9 is outside the exported range 1..8 of batch"):
        dim_ranges(m, max_batch=9)
    with pytest.raises(ValueError, match="outside the exported range"):
        dim_ranges(m, max_len=4096)
    with pytest.raises(ValueError, match="--max-active 100 is outside the exported range 1..64 of rows in window"):
        dim_ranges(m, max_active=100, mode="window")


def test_precision_must_match_export(engines):
    m = load_manifest(engines)
    check_precision(m, "fp32")
    with pytest.raises(ValueError, match="needs an export with --dtype bf16"):
        check_precision(m, "bf16")


def test_quantized_engines_are_refused_before_building(engines):
    m = load_manifest(engines)
    check_buildable(m)
    m.quantization = {"scheme": "int4", "block_size": 128}
    with pytest.raises(ValueError, match="int4 weight-only pieces for ONNX Runtime .* export without --quantize"):
        check_buildable(m)


def test_fingerprint_covers_gpu_trt_precision_and_profiles(target):
    fp = target.fingerprint()
    assert fp.startswith("sm90-trt11.4.0-fp32-")
    for change in ({"gpu_name": "NVIDIA H200"}, {"compute_capability": "8.9"}, {"trt_version": "10.13.0"},
                   {"precision": "bf16"}, {"max_len": 256}, {"max_active": 32}, {"opt_level": 5},
                   {"flavor": "rtx"}, {"max_batch": 4}):
        assert replace(target, **change).fingerprint() != fp, change
    assert replace(target).fingerprint() == fp


def test_rtx_fingerprint_names_flavour_version_and_targets(target):
    rtx = replace(target, flavor="rtx", gpu_name="", trt_version="1.7.1.116")
    assert replace(rtx, compute_capability="ampere+").fingerprint().startswith("ampere+-rtx1.7.1.116-fp32-")
    assert replace(rtx, compute_capability="7.5,8.6").fingerprint().startswith("sm75_sm86-rtx1.7.1.116-fp32-")
    assert replace(rtx, compute_capability="9.0").fingerprint() != target.fingerprint()   # same key but flavour


def test_choose_flavor():
    assert choose_flavor("auto", ["tensorrt"]) == "tensorrt"
    assert choose_flavor("auto", ["rtx"], "9.0") == "rtx"              # the only one: doctor says it will not run
    assert choose_flavor("auto", ["tensorrt", "rtx"]) == "rtx"          # no GPU: only RTX builds without one
    assert choose_flavor("auto", ["tensorrt", "rtx"], "8.9") == "rtx"   # an RTX GPU
    assert choose_flavor("auto", ["tensorrt", "rtx"], "9.0") == "tensorrt"  # Hopper: TensorRT proper
    assert choose_flavor("tensorrt", ["tensorrt", "rtx"], "8.9") == "tensorrt"
    with pytest.raises(ValueError, match="TensorRT for RTX is not installed .pip install tensorrt-rtx"):
        choose_flavor("rtx", ["tensorrt"])
    with pytest.raises(ValueError, match="TensorRT is not installed"):
        choose_flavor("auto", [])
    with pytest.raises(ValueError, match="auto, tensorrt or rtx"):
        choose_flavor("trt", ["tensorrt"])


@pytest.mark.parametrize("flavor, cc, ok, advice", [
    ("rtx", "7.5", False, "pip install tensorrt"),       # RTX 20xx: RTX has no fp32 GEMM there
    ("rtx", "8.6", True, ""), ("rtx", "8.9", True, ""), ("rtx", "12.0", True, ""),
    ("rtx", "9.0", False, "pip install tensorrt"),       # H100 / H200
    ("rtx", "10.0", False, "pip install tensorrt"),      # B200
    ("rtx", "7.0", False, "older than Turing"),
    ("tensorrt", "9.0", True, ""), ("tensorrt", "8.7", True, ""), ("tensorrt", "12.0", True, ""),
    ("tensorrt", "7.0", False, "Turing"),
])
def test_gpu_support(flavor, cc, ok, advice):
    got_ok, got_advice = gpu_support(flavor, cc)
    assert got_ok == ok and advice in got_advice


def test_rtx_targets():
    assert rtx_targets(None, None) == "ampere+"              # no GPU: RTX's default portable set
    assert rtx_targets(None, "8.9") == "8.9"                 # this RTX GPU
    assert rtx_targets(None, "9.0") == "ampere+"             # a GPU RTX cannot target: portable set
    assert rtx_targets("current", "12.0") == "12.0"
    assert rtx_targets("12.0, 8.6,12.0", None) == "8.6,12.0"  # sorted numerically, deduplicated
    assert rtx_targets("ampere+", "8.6") == "ampere+"
    for bad in ("9.0", "sm86", "", "8.6,10.0"):
        with pytest.raises(ValueError, match="builds for 8.0, 8.6"):
            rtx_targets(bad, None)
    for device in (None, "9.0"):
        with pytest.raises(ValueError, match="needs a GPU TensorRT for RTX supports"):
            rtx_targets("current", device)
    with pytest.raises(ValueError, match="no fp32 matrix multiplies on Turing .sm75."):
        rtx_targets("7.5,8.6", None)


def test_doctor_tensorrt_usable():
    none = tensorrt_usable({"tensorrt": None, "rtx": None}, "9.0", "")
    assert none.startswith("tensorrt: no (not installed") and "pip install tensorrt-rtx" in none
    h200_rtx = tensorrt_usable({"tensorrt": None, "rtx": "1.7.1.116"}, "9.0", "")
    assert h200_rtx.startswith("tensorrt: no (TensorRT for RTX 1.7.1.116") and "pip install tensorrt" in h200_rtx
    assert tensorrt_usable({"tensorrt": None, "rtx": "1.7.1"}, "8.9", "").startswith("tensorrt: yes (TensorRT for RTX")
    assert tensorrt_usable({"tensorrt": "11.4.0", "rtx": None}, "9.0", "").startswith("tensorrt: yes (TensorRT 11.4")
    cpu_rtx = tensorrt_usable({"tensorrt": None, "rtx": "1.7.1"}, None, "CUDA reports no GPU")
    assert cpu_rtx.startswith("tensorrt: build only") and "CUDA reports no GPU" in cpu_rtx
    cpu_trt = tensorrt_usable({"tensorrt": "10.13.0", "rtx": None}, None, "CUDA reports no GPU")
    assert cpu_trt.startswith("tensorrt: no (TensorRT 10.13.0 needs a GPU")
    both = tensorrt_usable({"tensorrt": "11.4.0", "rtx": "1.7.1"}, "9.0", "")
    assert "yes (TensorRT 11.4.0" in both and "no (TensorRT for RTX 1.7.1" in both
    assert "reinstall" in tensorrt_usable({"tensorrt": "broken (libnvinfer.so.11)", "rtx": None}, "9.0", "")


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
    assert stale_pieces(eng, m, target)[0] == ["head"]                    # only that piece is rebuilt
    fake_build(eng, m, target)
    record = json.loads((d / "build.json").read_text())
    record["target"]["trt_version"] = "10.0.0"                            # a record copied from elsewhere
    (d / "build.json").write_text(json.dumps(record))
    assert "another target" in plan_status(eng, m, target)[1]
    assert len(stale_pieces(eng, m, target)[0]) == len(m.pieces)         # a foreign record: everything
    fake_build(eng, m, target)
    m.pieces[0].sha256 = "0" * 64                                         # the ONNX file changed since
    assert "changed since its plan was built" in plan_status(eng, m, target)[1]


def test_runtime_finds_plans_built_with_other_limits(engines, target, tmp_path):
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


def test_flavours_never_load_each_others_plans(engines, target, tmp_path):
    eng = shutil.copytree(engines, tmp_path / "e")
    m = load_manifest(eng)
    rtx = replace(target, flavor="rtx", gpu_name="", compute_capability="ampere+", trt_version="1.7.1.116")
    fake_build(eng, m, rtx)
    assert find_built(eng, m, "NVIDIA GeForce RTX 4090", "8.9", "1.7.1.116", "fp32", "rtx") == rtx
    assert find_built(eng, m, "NVIDIA RTX A6000", "8.6", "1.7.1.116", "fp32", "rtx") == rtx  # portable set
    assert find_built(eng, m, "NVIDIA GeForce RTX 5090", "12.0", "1.7.1.116", "fp32", "rtx") == rtx
    assert find_built(eng, m, "NVIDIA H100", "9.0", "1.7.1.116", "fp32", "rtx") is None   # not in it
    assert find_built(eng, m, "NVIDIA GeForce RTX 4090", "8.9", "1.7.1.116", "fp32", "tensorrt") is None
    assert find_built(eng, m, "NVIDIA GeForce RTX 4090", "8.9", "1.8.0", "fp32", "rtx") is None   # other version
    assert plan_status(eng, m, replace(rtx, flavor="tensorrt"))[0] == "build"
    fake_build(eng, m, target)                                   # TensorRT proper, H100
    key = (target.gpu_name, target.compute_capability, target.trt_version, "fp32")
    assert find_built(eng, m, *key, "tensorrt") == target
    assert find_built(eng, m, *key, "rtx") is None
    # a TensorRT record copied over the RTX folder's record: the folder no longer matches its target
    d = plan_dir(eng, rtx)
    (d / "build.json").write_text((plan_dir(eng, target) / "build.json").read_text())
    assert "another target" in plan_status(eng, m, rtx)[1]
    assert find_built(eng, m, "NVIDIA GeForce RTX 4090", "8.9", "1.7.1.116", "fp32", "rtx") is None


def test_old_records_without_flavour_are_tensorrt(target):
    record = {k: v for k, v in target.__dict__.items() if k != "flavor"}
    assert Target(**record).flavor == "tensorrt"


def test_without_tensorrt(engines):
    import dllm_trt.export.tensorrt_build  # imports cleanly without TensorRT  # noqa: F401
    import dllm_trt.runtime.backends.tensorrt_backend  # noqa: F401

    def cli(*args):
        return subprocess.run([sys.executable, "-c", WITHOUT_TRT, *args], capture_output=True, text=True)

    doctor = cli("doctor")
    assert doctor.returncode == 0 and "tensorrt: no (not installed" in doctor.stdout
    build = cli("build", str(engines))
    assert build.returncode == 2 and "TensorRT is not installed" in build.stderr and "Traceback" not in build.stderr
    run = cli("generate", "--engines", str(engines), "--backend", "tensorrt", "--prompt", "Hi")
    assert run.returncode == 2 and "TensorRT is not installed" in run.stderr
    auto = cli("generate", "--engines", str(engines), "--prompt", "Hi", "--gen-length", "8", "--json")
    assert auto.returncode == 0 and '"onnxruntime (cpu' in auto.stdout   # auto falls back to ONNX Runtime


def test_backend_runs_each_mode_on_its_profile(engines, tmp_path, monkeypatch):
    """TensorRTBackend on a stand-in for TensorRT whose plans are the ONNX pieces run by ONNX Runtime at the addresses
    the backend binds (tests/fake_tensorrt.py): it decodes like the ONNX Runtime backend under every cache policy,
    window passes run on the window profile and refresh passes on the refresh profile. Canvases are longer than
    max_active (64), so a refresh fits no other profile."""
    from fake_tensorrt import VERSION, FakeTensorRT, assert_decodes_like
    from dllm_trt.runtime.backends import tensorrt_backend
    from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    eng = shutil.copytree(engines, tmp_path / "e")
    m = load_manifest(eng)
    fake_build(eng, m, Target("", "ampere+", VERSION, "fp32", 320, 64, flavor="rtx", max_batch=8))
    fake = FakeTensorRT(eng)
    monkeypatch.setattr(tensorrt_backend, "cuda_device", fake.cuda_device)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", fake.import_tensorrt)
    trt = tensorrt_backend.TensorRTBackend(eng)
    ort = OnnxRuntimeBackend(eng, threads=1)
    assert_decodes_like(trt, ort, gen=56, prompts=2, prompt_lengths=(12, 20))   # canvases beyond max_active
    ranges = {m.range_piece(r).name for r in range(len(m.layer_ranges))}
    assert {call for call in fake.calls if call[0] in ranges} == {(name, i) for name in ranges for i in (0, 1)}
    with pytest.raises(ModelError, match="plans were built for at most 320"):
        trt.begin(321)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed here (it is not available in this workplace)")
def test_tensorrt_build_and_generate(engines):
    from dllm_trt.export.tensorrt_build import build_plans
    from dllm_trt.runtime.backends.tensorrt_backend import TensorRTBackend

    build_plans(engines, precision="fp32", progress=False, flavor="tensorrt")
    assert TensorRTBackend(engines, flavor="tensorrt").describe().startswith("tensorrt")


def test_backend_decodes_several_sequences_per_call_on_the_batch_profiles(engines, tmp_path, monkeypatch, prompts):
    """Sequences stepped together go through one call per piece at batch > 1 (inside the plans' batch profiles, as
    the stand-in checks); each decodes as the ONNX Runtime backend decodes it alone."""
    from fake_tensorrt import VERSION, FakeTensorRT
    from dllm_trt.runtime.backends import tensorrt_backend
    from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dllm_trt.runtime.decoder import Decoder
    from dllm_trt.runtime.options import DecodeOptions, build

    eng = shutil.copytree(engines, tmp_path / "e")
    fake_build(eng, load_manifest(eng), Target("", "ampere+", VERSION, "fp32", 320, 64, flavor="rtx", max_batch=3))
    fake = FakeTensorRT(eng)
    monkeypatch.setattr(tensorrt_backend, "cuda_device", fake.cuda_device)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", fake.import_tensorrt)
    trt, ort = tensorrt_backend.TensorRTBackend(eng), OnnxRuntimeBackend(eng, threads=1)
    assert trt.max_batch == 3
    options = [DecodeOptions(cache="elastic", window=8, threshold=0.08, gamma=g) for g in (0.97, 0.995, 1.5)]
    options.append(DecodeOptions(cache="dual", threshold=0.08))
    reqs = [(prompts[i], options[i % len(options)]) for i in range(5)]

    def plan(opts):
        return build(opts, 32)

    expected = [Decoder(ort, *plan(o)[::-1]).generate(p).canvas_ids for p, o in reqs]
    decoder = Decoder(trt)
    seqs = [decoder.start(p, *plan(o)) for p, o in reqs]
    while not all(s.done for s in seqs):
        decoder.step([s for s in seqs if not s.done])
    assert [decoder.finish(s).canvas_ids for s in seqs] == expected
    batched = [c for c in fake.batches if c > 1]
    assert batched and max(batched) == 3   # five sequences: calls of three and of two
