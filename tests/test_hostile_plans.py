"""Hostile or broken plan folders and verification caches (issue #21, items 13 and 14): symlinks that would make
plans (code the GPU runs) be written or loaded outside the engine folder, malformed build.json files, things of the
wrong kind where a plan or a plan folder belongs, a plan swapped for another of the same size, and a shared
$DLLM_TRT_CACHE_DIR whose records or planted symlinks would skip hashing or overwrite other files. Every refusal is
one line, never a traceback."""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dllm_trt.cli import main
from dllm_trt.runtime import manifest as manifest_module
from dllm_trt.export import tensorrt_build
from dllm_trt.export.tensorrt_build import dim_ranges, write_record
from dllm_trt.runtime.backends import tensorrt_backend
from dllm_trt.runtime.backends.base import BackendError
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import load_manifest
from dllm_trt.runtime.trt_plans import Target, find_built, plan_dir, stale_pieces

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install -e '.[tensorrt-rtx]')")
RTX_VERSION = "1.7.1.116"


@pytest.fixture
def eng(tiny_engines, tmp_path):
    return shutil.copytree(tiny_engines, tmp_path / "eng")


@pytest.fixture
def target():
    return Target("", "ampere+", RTX_VERSION, "fp32", 320, 64, flavor="rtx")


def fake_build(eng, target, hashes=True):
    """Plans of equal size (so that any can pass for another by size) and their record, as a build would leave."""
    m = load_manifest(eng)
    d = plan_dir(eng, target)
    d.mkdir(parents=True, exist_ok=True)
    blobs = {p.name: f"plan:{p.name}".ljust(64).encode() for p in m.pieces}
    for name, blob in blobs.items():
        (d / f"{name}.plan").write_bytes(blob)
    write_record(eng, m, target, plan_sha256={n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}
                 if hashes else None)
    return d


def build_cli_target(eng):
    """The target `dllm-trt build ENG --trt-flavor rtx` builds for on this machine."""
    import tensorrt_rtx

    m = load_manifest(eng)
    _, gpu_name, device_cc = tensorrt_backend.cuda_device()
    return tensorrt_build.build_target(tensorrt_rtx, "rtx", m.dtype, dim_ranges(m), 3, None, gpu_name, device_cc)


def cli_build(eng, capsys):
    """(exit code, stderr lines) of `dllm-trt build ENG --trt-flavor rtx`, run in this process."""
    try:
        main(["build", str(eng), "--trt-flavor", "rtx"])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def one_line_error(code, lines, *words):
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dllm-trt: error: "), lines
    for w in words:
        assert w in lines[0], lines


def fake_gpu_backend(monkeypatch):
    """TensorRTBackend as on an RTX 4090 with TensorRT for RTX, up to the point where TensorRT itself is needed."""
    monkeypatch.setattr(tensorrt_backend, "cuda_device", lambda: (SimpleNamespace(), "NVIDIA GeForce RTX 4090", "8.9"))
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt",
                        lambda flavor="auto", cc=None: (SimpleNamespace(__version__=RTX_VERSION), "rtx"))


# ---- item 13: symlinks in trt/ --------------------------------------------------------------------------------
@needs_rtx
def test_trt_symlink_is_refused_at_build(eng, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (eng / "trt").symlink_to(outside)
    code, lines = cli_build(eng, capsys)
    one_line_error(code, lines, str(eng / "trt"), "symlink")
    assert list(outside.iterdir()) == []  # nothing written through the link


@needs_rtx
@pytest.mark.parametrize("what", ["folder", "plan", "record", "stray"])
def test_symlinks_under_trt_are_refused_at_build(eng, tmp_path, capsys, what):
    d = fake_build(eng, build_cli_target(eng))
    outside = tmp_path / "elsewhere"
    if what == "folder":  # trt/<fingerprint> -> a folder outside, holding a complete, matching plan set
        shutil.move(d, outside)
        d.symlink_to(outside)
        link = d
    else:
        name = {"plan": "head.plan", "record": "build.json", "stray": "runtime.cache"}[what]
        link = d / name
        outside.mkdir()
        if link.exists():
            shutil.move(link, outside / name)
        link.symlink_to(outside / name)
    code, lines = cli_build(eng, capsys)
    one_line_error(code, lines, str(link), "symlink")


def test_symlinks_are_refused_at_load(eng, tmp_path, target, monkeypatch):
    d = fake_build(eng, target)
    outside = tmp_path / "elsewhere"
    shutil.move(d.parent, outside)
    (eng / "trt").symlink_to(outside)
    fake_gpu_backend(monkeypatch)
    with pytest.raises(BackendError, match=r"trt is a symlink"):
        tensorrt_backend.TensorRTBackend(eng)
    (eng / "trt").unlink()
    shutil.move(outside, eng / "trt")
    plan = d / "embed.plan"
    shutil.move(plan, tmp_path / "embed.plan")
    plan.symlink_to(tmp_path / "embed.plan")
    with pytest.raises(BackendError, match=r"embed.plan is a symlink"):
        tensorrt_backend.TensorRTBackend(eng)


# ---- item 13: malformed build.json ----------------------------------------------------------------------------
MALFORMED = {
    "list": b"[]",
    "not-utf8": b'{"target": "\xff\xfe"}',
    "deeply-nested": b"[" * 100_000,
    "5000-digit int": b'{"target": ' + b"1" * 5000 + b"}",
    "maps of the wrong type": None,     # filled in from a real record below
    "target of the wrong types": None,
    "profiles of the wrong type": None,
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_build_record_is_not_trusted(eng, target, kind):
    d = fake_build(eng, target)
    record = json.loads((d / "build.json").read_text())
    if kind == "maps of the wrong type":
        content = json.dumps({**record, "onnx_sha256": [], "plan_size": "x"}).encode()
    elif kind == "profiles of the wrong type":
        content = json.dumps({**record, "profiles": {"embed": "all"}}).encode()
    elif kind == "target of the wrong types":
        content = json.dumps({**record, "target": {**record["target"], "flavor": ["rtx"],
                                                   "compute_capability": 86}}).encode()
    else:
        content = MALFORMED[kind]
    (d / "build.json").write_bytes(content)
    m = load_manifest(eng)
    stale, why = stale_pieces(eng, m, target)
    assert stale == [p.name for p in m.pieces] and "build.json" in why
    assert find_built(eng, m, "NVIDIA GeForce RTX 4090", "8.9", RTX_VERSION, "fp32", "rtx") is None


@needs_rtx
def test_build_over_a_malformed_record_rebuilds_in_one_line(eng, capsys):
    d = fake_build(eng, build_cli_target(eng))
    (d / "build.json").write_bytes(b'{"target": "\xff"}')
    code, lines = cli_build(eng, capsys)
    assert code == 0 and not any("Traceback" in line for line in lines), lines
    assert any("not UTF-8" in line and "building" in line for line in lines), lines
    assert stale_pieces(eng, load_manifest(eng), build_cli_target(eng))[0] == []


# ---- item 13: things of the wrong kind where plans belong -------------------------------------------------------
@needs_rtx
def test_plan_replaced_by_a_folder(eng, capsys, target, monkeypatch):
    d = fake_build(eng, build_cli_target(eng))
    (d / "embed.plan").unlink()
    (d / "embed.plan").mkdir()
    (d / "embed.plan" / "x").write_text("")
    code, lines = cli_build(eng, capsys)
    one_line_error(code, lines, str(d / "embed.plan"), "not a file")
    shutil.rmtree(d / "embed.plan")                  # and at load
    d = fake_build(eng, target)
    (d / "head.plan").unlink()
    (d / "head.plan").mkdir()
    fake_gpu_backend(monkeypatch)
    with pytest.raises(BackendError, match=r"head.plan is not a file"):
        tensorrt_backend.TensorRTBackend(eng)


@needs_rtx
def test_plan_folder_that_is_a_file(eng, capsys):
    d = plan_dir(eng, build_cli_target(eng))
    d.parent.mkdir()
    d.write_text("not a folder")
    code, lines = cli_build(eng, capsys)
    one_line_error(code, lines, str(d), "not a folder")


@needs_rtx
def test_trt_that_is_a_file(eng, capsys):
    (eng / "trt").write_text("")
    code, lines = cli_build(eng, capsys)
    one_line_error(code, lines, str(eng / "trt"), "not a folder")


def test_range_plan_without_its_two_profiles_is_refused_at_load(tmp_path):
    """The runtime selects a range's window and refresh profiles by index: a plan with one profile (as plans of
    the first contract had) is refused in one line rather than run on the wrong shapes."""
    plan = tmp_path / "layers_00_02.plan"
    with pytest.raises(BackendError, match=r"layers_00_02.plan: the plan has 1 optimization profiles, this runtime "
                                           r"expects 2 \(window, refresh\); rebuild it with dllm-trt build"):
        tensorrt_backend.check_profiles(plan, SimpleNamespace(num_optimization_profiles=1), "layers")
    tensorrt_backend.check_profiles(plan, SimpleNamespace(num_optimization_profiles=2), "layers")
    tensorrt_backend.check_profiles(tmp_path / "head.plan", SimpleNamespace(num_optimization_profiles=1), "head")


# ---- item 13: build verifies what the runtime verifies --------------------------------------------------------
def test_swapped_plan_of_the_same_size_is_stale_for_build_too(eng, target):
    from dllm_trt.runtime.trt_plans import PlanError, read_plan

    d = fake_build(eng, target)
    m = load_manifest(eng)
    assert stale_pieces(eng, m, target) == ([], "")
    shutil.copyfile(d / "head.plan", d / "embed.plan")   # same size, another piece's plan
    stale, why = stale_pieces(eng, m, target)
    assert stale == ["embed"] and why == f"{d / 'embed.plan'} is not the plan that was built there"
    record = json.loads((d / "build.json").read_text())
    with pytest.raises(PlanError, match="is not the plan that was built there"):   # the runtime's check, the same one
        read_plan(d / "embed.plan", record["plan_size"]["embed"], record["plan_sha256"]["embed"])
    with pytest.raises(BackendError, match="is not the plan that was built there"):
        tensorrt_backend.load_plan(None, None, d / "embed.plan", "rtx", record["plan_sha256"]["embed"])


@needs_rtx
def test_build_rebuilds_a_swapped_plan_instead_of_calling_it_up_to_date(eng, capsys):
    target = build_cli_target(eng)
    d = fake_build(eng, target)
    shutil.copyfile(d / "head.plan", d / "embed.plan")
    code, lines = cli_build(eng, capsys)
    assert code == 0 and not any("up to date" in line for line in lines), lines
    assert any("building 1 of" in line and "not the plan that was built there" in line for line in lines), lines
    record = json.loads((d / "build.json").read_text())
    assert hashlib.sha256((d / "embed.plan").read_bytes()).hexdigest() == record["plan_sha256"]["embed"]
    assert not [f for f in os.listdir(d) if "partial" in f]     # no temporary files left behind


# ---- item 14: the verification cache --------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("DLLM_TRT_CACHE_DIR", str(d))
    monkeypatch.setattr(manifest_module, "_IN_MEMORY", {})
    monkeypatch.setattr(manifest_module, "_UNTRUSTED_SAID", set(), raising=False)
    return d


def corrupt_with_forged_record(eng, record_path):
    """Overwrite head.onnx.data (same size) and write, at record_path, a record saying this very file version was
    hashed and matched manifest.json."""
    data = eng / "head.onnx.data"
    with open(data, "r+b") as f:
        f.write(b"\0" * 64)
    sha = next(p["data_sha256"] for p in json.loads((eng / "manifest.json").read_text())["pieces"]
               if p.get("data_file") == "head.onnx.data")
    st = data.stat()
    record_path.write_text(json.dumps({str(data.resolve()): [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                                             st.st_dev, sha]}))


def test_planted_symlinks_at_temporary_names_are_not_followed(eng, cache, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (f"verified.json.{os.getpid()}.tmp", "verified.json.tmp"):
        (cache / name).symlink_to(victim)
    load_manifest(eng)
    assert victim.read_text() == "precious"
    assert (cache / "verified.json").is_file() and not (cache / "verified.json").is_symlink()
    assert len(json.loads((cache / "verified.json").read_text())) == 4


@pytest.mark.parametrize("mode", [0o770, 0o707, "another owner"])
def test_cache_dir_writable_by_others_is_not_trusted(eng, cache, capsys, monkeypatch, mode):
    corrupt_with_forged_record(eng, cache / "verified.json")
    if mode == "another owner":
        if os.getuid() != 0:
            pytest.skip("only root can give the folder to another user")
        os.chown(cache, 12345, 12345)
    else:
        cache.chmod(mode)
    before = sorted(os.listdir(cache)), (cache / "verified.json").read_bytes()
    for _ in range(2):
        with pytest.raises(ModelError, match="head.onnx.data: weights do not match"):
            load_manifest(eng)
    err = capsys.readouterr().err
    assert err.count(str(cache)) == 1 and "hashing" in err and len(err.strip().splitlines()) == 1, err
    assert (sorted(os.listdir(cache)), (cache / "verified.json").read_bytes()) == before   # nothing written there


def test_untrusted_cache_dir_is_not_written(tiny_engines, tmp_path, cache, capsys):
    eng = shutil.copytree(tiny_engines, tmp_path / "eng2")
    cache.chmod(0o777)
    load_manifest(eng)
    assert os.listdir(cache) == []
    assert "hashing" in capsys.readouterr().err


def test_verified_json_symlink_is_not_followed(eng, cache, tmp_path):
    forged = tmp_path / "attacker" / "forged.json"
    forged.parent.mkdir()
    corrupt_with_forged_record(eng, forged)
    (cache / "verified.json").symlink_to(forged)
    with pytest.raises(ModelError, match="head.onnx.data: weights do not match"):
        load_manifest(eng)


@needs_rtx
def test_build_that_cannot_write_its_plans_ends_in_one_line(eng):
    """A write that fails (here: a file-size limit, as a full disk would) is one line, and no partial file is left."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
              "from dllm_trt.cli import main; main(sys.argv[1:])")
    run = subprocess.run([sys.executable, "-c", script, "build", str(eng), "--trt-flavor", "rtx"],
                         capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    lines = [line for line in run.stderr.splitlines() if line.startswith(("dllm-trt", "Traceback"))]
    assert run.returncode == 2 and lines == [lines[0]] and "while building plans" in lines[0], run.stderr
    assert not [f for f in os.listdir(plan_dir(eng, build_cli_target(eng))) if "partial" in f]
