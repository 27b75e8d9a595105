"""Hardening of the CLI's own inputs and outputs: output files checked before a long run and never lost after it,
problem files that never end or nest forever, non-finite gammas, thread bombs, and the generation length a
checkpoint declares (issue #21, items 5, 7, 12 and 15)."""
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from dllm_trt import cli
from dllm_trt.cli import DEFAULT_MODEL, main
from dllm_trt.evaluate import harness, outputs
from dllm_trt.runtime.backends import onnxruntime_backend as ob
from dllm_trt.runtime.backends.base import BackendError
from dllm_trt.runtime.config import ModelError, load_config

REPO = DEFAULT_MODEL.parents[1]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"question": "Hello there", "answer": "#### 1"}) + "\n")
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Refusals must come before any model is opened."""
    def fail(*_):
        raise AssertionError("opened a model before refusing")
    monkeypatch.setattr(cli, "open_backend", fail)


# ---- item 5: outputs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["missing-folder", "under-a-file", "a-folder"])
def test_unwritable_out_is_refused_before_the_run(where, tmp_path, problems_file, capsys, no_decoding):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    out = {"missing-folder": tmp_path / "nope" / "r.json", "under-a-file": tmp_path / "file" / "r.json",
           "a-folder": tmp_path / "folder"}[where]
    for command in (["eval"], ["bench", "--gen-lengths", "16"]):
        code, err = run_cli([*command, "--model", str(DEFAULT_MODEL), "--data", str(problems_file),
                             "--out", str(out)], capsys)
        assert code == 2 and err.count("\n") == 1 and f"--out {out}" in err, err
    code, err = run_cli(["bench", "--model", str(DEFAULT_MODEL), "--data", str(problems_file),
                         "--gamma-sweep", "0.9", "--plot", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"--plot {out}" in err, err


def test_existing_out_file_is_not_truncated_by_the_check(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("keep")
    outputs.check_output(str(out), "--out")
    assert out.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_out_never_overwrites_an_input(tmp_path, problems_file, tiny_engines, capsys, no_decoding):
    for args, out in ((["--model", str(DEFAULT_MODEL)], problems_file),
                      (["--model", str(DEFAULT_MODEL)], DEFAULT_MODEL / "config.json"),
                      (["--engines", str(tiny_engines)], tiny_engines / "manifest.json"),
                      (["--engines", str(tiny_engines)], tiny_engines / "new.json")):
        before = out.read_bytes() if out.exists() else None
        code, err = run_cli(["eval", *args, "--data", str(problems_file), "--out", str(out)], capsys)
        assert code == 2 and "would overwrite the input" in err and err.count("\n") == 1, err
        assert (out.read_bytes() if out.exists() else None) == before


@pytest.mark.parametrize("name", ["p.txt", "noext"])
def test_plot_needs_a_file_type_matplotlib_writes(name, tmp_path, problems_file, capsys, no_decoding):
    code, err = run_cli(["bench", "--model", str(DEFAULT_MODEL), "--data", str(problems_file), "--gamma-sweep", "0.9",
                         "--plot", str(tmp_path / name)], capsys)
    assert code == 2 and "must end in one of" in err and ".png" in err, err


def test_a_failed_write_leaves_no_truncated_file(tmp_path, monkeypatch, capsys):
    import errno

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "fallback"))
    (tmp_path / "fallback").mkdir()
    target = tmp_path / "out" / "r.json"
    target.parent.mkdir()

    def write(path):
        with open(path, "w") as f:
            f.write("{partial")
            if Path(path).parent == target.parent:
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write("}")

    assert outputs.save(str(target), "results", write) is False
    assert list(target.parent.iterdir()) == []      # neither a 0-byte nor a half-written file
    [saved] = (tmp_path / "fallback").iterdir()
    assert saved.read_text() == "{partial}" and str(saved) in capsys.readouterr().err


def test_results_survive_an_out_folder_that_vanishes_during_the_run(tiny_dir, tmp_path, problems_file, capsys,
                                                                      monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    real = harness.evaluate

    def evaluate_then_remove(*args, **kwargs):
        summaries = real(*args, **kwargs)
        shutil.rmtree(folder)
        return summaries

    monkeypatch.setattr(harness, "evaluate", evaluate_then_remove)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, err = run_cli(["eval", "--model", str(tiny_dir), "--backend", "torch", "--layers-per-range", "4",
                         "--data", str(problems_file), "--gen-length", "16", "--cache", "elastic",
                         "--no-llada-baseline", "--out", str(folder / "r.json")], capsys)
    assert code == 1  # the table was printed and the results kept, but not where asked
    assert f"could not write {folder / 'r.json'}" in err
    saved = err.rsplit("saved to ", 1)[1].split(" instead")[0]
    assert saved.startswith(str(tmp_path)) and json.loads(open(saved).read())["meta"]["problems"] == 1


# ---- item 12: problem files and sweep values ------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    ('{"question": "q", "answer": ' + "9" * 5000 + "}\n", "expected a JSON object"),
    (b"\xff\xfe not text\n", "not UTF-8"),
    ("x" * (harness.MAX_LINE_BYTES + 10), "line longer than"),
], ids=["deep", "digits", "bytes", "long-line"])
def test_malformed_problem_files_are_one_line(content, message, tmp_path, capsys, no_decoding):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = run_cli(["eval", "--model", str(DEFAULT_MODEL), "--data", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_endless_problem_source_is_refused_not_read_into_memory(capsys, no_decoding):
    code, err = run_cli(["eval", "--model", str(DEFAULT_MODEL), "--data", "/dev/zero"], capsys)
    assert code == 2 and "line longer than" in err


def test_blank_lines_without_end_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "MAX_DATA_BYTES", 1000)
    path = tmp_path / "blank.jsonl"
    path.write_text("\n" * 5000)
    with pytest.raises(ValueError, match="without reaching --limit"):
        harness.load_problems(str(path))


@pytest.mark.parametrize("gamma", ["nan", "inf", "-inf", "5"])
def test_gamma_sweep_takes_only_valid_gammas(gamma, problems_file, capsys, no_decoding):
    code, err = run_cli(["bench", "--model", str(DEFAULT_MODEL), "--data", str(problems_file),
                         "--gamma-sweep", f"0.9,{gamma}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--gamma-sweep" in err, err


# ---- item 7: threads -----------------------------------------------------------------------------------------------
def test_threads_are_capped_at_the_cpus_this_process_may_use(monkeypatch, capsys):
    monkeypatch.setattr(ob, "usable_cpus", lambda: 2)
    assert ob.session_threads(3000) == 2
    assert "3000 threads asked for; using 2" in capsys.readouterr().err
    assert ob.session_threads(2) == 2 and ob.session_threads(1) == 1
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("DLLM_TRT_THREADS", "9" * 5000)  # no int() ValueError on a 5000-digit number
    assert ob.session_threads(None) == 2
    with pytest.raises(BackendError):
        ob.session_threads(0)


def test_cli_threads_bomb_starts_only_usable_threads(tiny_engines, capsys):
    main(["generate", "--engines", str(tiny_engines), "--prompt", "Hi", "--gen-length", "8", "--threads", "99999",
          "--json"])
    captured = capsys.readouterr()
    assert f"using {ob.usable_cpus()}" in captured.err
    assert json.loads(captured.out)["tokens"] >= 0


def test_threads_flag_goes_to_the_backend_not_the_environment(tiny_engines, monkeypatch, capsys):
    monkeypatch.delenv("DLLM_TRT_THREADS", raising=False)
    main(["generate", "--engines", str(tiny_engines), "--prompt", "Hi", "--gen-length", "8", "--threads", "1",
          "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] >= 0
    assert "DLLM_TRT_THREADS" not in os.environ


def test_usable_cpus_follows_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(ob.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(ob, "cgroup_cpu_limit", lambda: None)
    assert ob.usable_cpus() == 6
    monkeypatch.setattr(ob, "cgroup_cpu_limit", lambda: 3)
    assert ob.usable_cpus() == 3


# ---- item 15: the checkpoint's own generation length ----------------------------------------------------------------
def test_bundled_model_declares_its_trained_length():
    assert load_config(DEFAULT_MODEL).default_gen_length == 128


def test_readme_command_without_gen_length_answers(capsys):
    """The README's first command, as written there (its flags and prompt), on the torch backend."""
    command = re.search(r"&& dllm-trt (generate [^\n]*)", (REPO / "README.md").read_text()).group(1)
    flags, prompt = re.fullmatch(r'(generate[^"]*)--prompt "([^"]+)"', command).groups()
    assert "--gen-length" not in flags
    main([*flags.split(), "--prompt", prompt, "--backend", "torch", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["canvas_ids"]) == 128
    assert "#### 61" in out["text"], out["text"]


def test_declared_length_reaches_the_manifest_and_the_api(tiny_dir, tmp_path):
    from dllm_trt.export.onnx_export import export_model
    from dllm_trt.runtime.api import Engine

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 24}))
    assert len(Engine.load(model, backend="torch").generate("Hi", cache="none").canvas_ids) == 24
    out = tmp_path / "engines"
    export_model(model, out, layers_per_range=4, max_len=64, max_active=32, quiet=True)
    engine = Engine.load(out)
    assert engine.backend.config.default_gen_length == 24
    assert len(engine.generate("Hi", cache="none").canvas_ids) == 24
    assert len(engine.generate("Hi", cache="none", max_tokens=8).canvas_ids) == 8   # the request still wins
    prompt = "x " * 25                                                             # what fits stays the ceiling
    assert len(engine.generate(prompt, cache="elastic").canvas_ids) == 64 - len(engine.encode(prompt))


@pytest.mark.parametrize("value", [0, "many", -1, True])
def test_bad_declared_length_is_one_line(value, tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": value}))
    with pytest.raises(ModelError, match="max_new_tokens"):
        load_config(model)


def test_a_changed_declared_length_exports_anew(tiny_dir, tmp_path):
    """generate --model caches its export by checkpoint fingerprint: the length lives in the manifest, so a
    changed generation_config.json must not reuse an export made before the change."""
    from dllm_trt.runtime.engine import export_cache_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    before = export_cache_dir(model, tmp_path / "engines", layers_per_range=1)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 24}))
    assert export_cache_dir(model, tmp_path / "engines", layers_per_range=1) != before


@pytest.mark.parametrize("command", [["generate", "--engines", "{long}", "--prompt", "hi"],
                                     ["generate", "--model", "{long}", "--prompt", "hi"],
                                     ["export", "--model", str(DEFAULT_MODEL), "--out", "{long}"],
                                     ["check", "{long}"], ["eval", "--data", "{long}"]])
def test_file_system_refusals_are_one_line(command, tmp_path, capsys):
    """A name longer than the file system allows (ENAMETOOLONG) used to end in an OSError traceback."""
    long = str(tmp_path / ("a" * 300))
    code, err = run_cli([arg.replace("{long}", long) for arg in command], capsys)
    assert code == 2 and err.count("\n") == 1 and "too long" in err, err


def test_torch_canvas_beyond_memory_is_one_line(tiny_dir, tmp_path, capsys):
    """A checkpoint may declare a million positions; a canvas that long used to end in torch's allocation
    traceback (or, worse, in the machine's swap) instead of a refusal naming the sizes."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_sequence_length": 10 ** 6}))
    code, err = run_cli(["generate", "--model", str(model), "--backend", "torch", "--layers-per-range", "4",
                         "--prompt", "hi", "--gen-length", "300000"], capsys)
    assert code == 2 and err.count("\n") == 1 and "a canvas of 300" in err and "needs at least" in err, err


@pytest.mark.parametrize("value", ["0", "1025", "-3"])
def test_export_max_batch_out_of_range_is_one_line(value, tmp_path, capsys):
    code, err = run_cli(["export", "--model", str(DEFAULT_MODEL), "--out", str(tmp_path / "e"), "--max-batch", value],
                        capsys)
    assert code == 2 and err.count("\n") == 1 and "--max-batch must be in 1..1024" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args", [["serve", "--engines", "E", "--max-batch", "1025"],
                                  ["serve", "--engines", "E", "--max-batch", "0"],
                                  ["serve", "--engines", "E", "--max-queue", "100000"],
                                  ["bench", "--data", "D", "--concurrency", "4,5000"],
                                  ["bench", "--data", "D", "--concurrency", "4", "--max-batch", "100000"]],
                         ids=["serve-big", "serve-zero", "queue", "clients", "bench-batch"])
def test_batch_and_client_counts_are_bounded_before_anything_starts(args, capsys):
    """No engine is opened and no thread started for a count beyond MAX_BATCH_LIMIT: one line instead."""
    code, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and ("1..1024" in err or "0..4096" in err), err
