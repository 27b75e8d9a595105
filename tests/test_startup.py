"""Start-up of the ONNX Runtime backend: threads from the physical cores, --threads, sessions built side by side."""
import pytest

from dllm_trt.cli import main
from dllm_trt.runtime.backends import onnxruntime_backend as ob
from dllm_trt.runtime.backends.base import BackendError
from dllm_trt.runtime.backends.onnxruntime_backend import (OnnxRuntimeBackend, cgroup_cpu_limit, default_threads,
                                                           physical_cores)
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.policies import make_policy
from dllm_trt.runtime.schedule import WindowSchedule


def fake_sysfs(root, cores: dict[int, tuple[int, int]]):
    for cpu, (package, core) in cores.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


def test_smt_siblings_count_as_one_core(tmp_path):
    sysfs = fake_sysfs(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0), 5: (1, 0)})
    assert physical_cores({0, 1, 2, 3, 4, 5}, sysfs) == 3     # (package, core) pairs, not core ids alone
    assert physical_cores({0, 2}, sysfs) == 1                  # only the CPUs this process may use
    assert physical_cores({0, 1, 7}, sysfs) == 3               # topology unreadable: every CPU counts


def test_cgroup_quota_rounds_up(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert cgroup_cpu_limit(f) is None
    f.write_text("150000 100000\n")
    assert cgroup_cpu_limit(f) == 2
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_threads_from_environment_or_physical_cores(monkeypatch):
    monkeypatch.delenv("DLLM_TRT_THREADS", raising=False)
    monkeypatch.setattr(ob, "physical_cores", lambda: 6)
    monkeypatch.setattr(ob, "cgroup_cpu_limit", lambda: 4)
    assert default_threads() == 4
    monkeypatch.setattr(ob, "cgroup_cpu_limit", lambda: None)
    assert default_threads() == 6
    monkeypatch.setenv("DLLM_TRT_THREADS", "3")
    assert default_threads() == 3
    for bad in ("two", "\u00b2", "0"):   # a superscript two is a digit to str.isdigit, not to int()
        monkeypatch.setenv("DLLM_TRT_THREADS", bad)
        with pytest.raises(BackendError, match="DLLM_TRT_THREADS must be a positive whole number"):
            default_threads()


def test_every_session_gets_the_threads_and_does_not_spin(tiny_engines, monkeypatch):
    monkeypatch.setenv("DLLM_TRT_THREADS", "3")
    monkeypatch.setattr(ob, "usable_cpus", lambda: 4)
    backend = OnnxRuntimeBackend(tiny_engines)
    assert backend.threads == 3
    for session in backend.sessions.values():
        opts = session.get_session_options()
        assert opts.intra_op_num_threads == 3
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_threads_flag_reaches_the_backend_and_is_checked(tiny_engines, monkeypatch, capsys):
    monkeypatch.delenv("DLLM_TRT_THREADS", raising=False)
    seen = []
    real = OnnxRuntimeBackend.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.threads)

    monkeypatch.setattr(OnnxRuntimeBackend, "__init__", spy)
    main(["generate", "--engines", str(tiny_engines), "--prompt", "Hi", "--gen-length", "8", "--threads", "1"])
    assert seen == [1]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--engines", str(tiny_engines), "--prompt", "Hi", "--threads", "0"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.endswith("--threads must be at least 1, got 0") and len(err.splitlines()) == 1


def test_sessions_built_side_by_side_decode_like_one_by_one(tiny_engines, prompts, monkeypatch):
    runs = []
    for workers in (1, 4):
        monkeypatch.setattr(ob, "LOAD_WORKERS", workers)
        backend = OnnxRuntimeBackend(tiny_engines, threads=1)
        assert list(backend.sessions) == [p.name for p in backend.manifest.pieces]
        runs.append([Decoder(backend, make_policy("elastic"), WindowSchedule(24, 8, 0.1)).generate(p).canvas_ids
                     for p in prompts[:3]])
    assert runs[0] == runs[1]


def test_a_piece_that_fails_to_load_in_a_worker_is_one_line(tiny_engines, monkeypatch):
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, *args, **kwargs):
        if path.endswith("head.onnx"):
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : head is broken\nmore detail")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(ModelError, match="ONNX Runtime cannot load the pieces .*head is broken") as exc:
        OnnxRuntimeBackend(tiny_engines, threads=1)
    assert "\n" not in str(exc.value)


def test_extended_fusions_decode_as_basic_rewrites(tiny_engines, prompts, monkeypatch):
    import onnxruntime as ort

    runs = []
    for setting, level in (("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                           ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)):
        monkeypatch.setattr(ob, "GRAPH_OPTIMIZATION", setting)
        backend = OnnxRuntimeBackend(tiny_engines, threads=1)
        assert {s.get_session_options().graph_optimization_level for s in backend.sessions.values()} == {level}
        runs.append([Decoder(backend, make_policy("elastic"), WindowSchedule(24, 8, 0.1)).generate(p).canvas_ids
                     for p in prompts[:3]])
    assert runs[0] == runs[1]
