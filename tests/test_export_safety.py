"""`dllm-trt export --out DIR` replaces only what is provably an engine folder of ours, and an export that is
interrupted, runs out of disk or races another export leaves everything as it was (issue #21)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dllm_trt.cli import main
from dllm_trt.export import onnx_export
from dllm_trt.runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A one-layer checkpoint: four pieces, the quickest export there is."""
    from dllm_trt.export.checkpoint_writer import byte_tokenizer, random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(n_layers=1, d_model=32, n_heads=2, max_len=32)
    return write_checkpoint(tmp_path_factory.mktemp("small") / "model", cfg, random_weights(cfg, 1), byte_tokenizer())


@pytest.fixture(scope="module")
def template(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("template") / "eng"
    onnx_export.export_model(small, out, max_len=16, quiet=True)
    return out


@pytest.fixture
def eng(template, tmp_path):
    """An engine folder of our own (exported with --max-len 16), alone in its parent folder."""
    out = tmp_path / "place" / "eng"
    shutil.copytree(template, out)
    return out


def export(capsys, *args):
    """(exit code, stderr) of `dllm-trt export ARGS`; 0 when it returns."""
    try:
        main(["export", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The one line left on stderr besides the progress bar (and the notice that a Ctrl-C was heard)."""
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(("export:", "stopping after the current piece"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    """Every entry under `folder` (hidden ones too) with the bytes of each file and the target of each link."""
    def content(p):
        if p.is_symlink():
            return os.readlink(p)
        return p.read_bytes() if p.is_file() else None
    return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*"))}


def before_piece(monkeypatch, n, action):
    """export_piece calls action(out) first when exporting piece number n (from 1)."""
    real, calls = onnx_export.export_piece, []

    def piece(spec, ckpt, out, *rest):
        calls.append(spec.name)
        if len(calls) == n:
            action(out)
        return real(spec, ckpt, out, *rest)
    monkeypatch.setattr(onnx_export, "export_piece", piece)
    return calls


# ---- item 1: only a folder that is provably ours is replaced -------------------------------------------------------
def test_a_folder_with_someone_elses_manifest_is_refused(small, tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text('{"name": "app"}')
    (site / "index.html").write_text("x")
    before = snapshot(tmp_path)
    code, err = export(capsys, "--model", str(small), "--out", str(site))
    assert code == 2
    assert one_line(err) == f"dllm-trt: error: {site}: holds a manifest.json that is not a dllm-trt manifest; " \
                            f"choose a new or empty --out"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("extra", ["notes.txt", "backup/old.onnx", "trt/notes.txt", "trt/abc/notes.txt",
                                   "trt/abc/.notes.txt.x1.partial"])
def test_an_engine_folder_with_files_its_manifest_does_not_list_is_refused(small, eng, capsys, extra):
    (eng / extra).parent.mkdir(parents=True, exist_ok=True)
    (eng / extra).write_text("mine")
    before = snapshot(eng.parent)
    code, err = export(capsys, "--model", str(small), "--out", str(eng))
    assert code == 2
    assert f"{eng}: holds files its manifest.json does not list ({extra.split('/')[0]})" in one_line(err)
    assert snapshot(eng.parent) == before


def test_an_engine_folder_with_tensorrt_plans_is_replaced_as_a_whole(small, eng, capsys):
    """trt/ as `dllm-trt build` leaves it belongs to the engine folder; siblings, among them an old-style
    <out>.partial, are someone else's and stay."""
    plans = eng / "trt" / "0123abcd"
    plans.mkdir(parents=True)
    for name in ("embed.plan", "head.plan.partial", ".head.plan.k2j_3x.partial", "build.json",
                 ".build.json.a1b2c3.partial", "runtime.cache"):
        (plans / name).write_bytes(b"plan")
    for name in ("timing-0123abcd.cache", ".timing-0123abcd.cache.zz9_q1.partial"):
        (eng / "trt" / name).write_bytes(b"cache")
    (eng.parent / "eng.partial").mkdir()
    (eng.parent / "eng.partial" / "keep.txt").write_text("mine")
    (eng.parent / ".eng.lock").write_text("a user's lock file")
    code, err = export(capsys, "--model", str(small), "--out", str(eng), "--max-len", "24")
    assert code == 0, err
    assert not (eng / "trt").exists()
    assert load_manifest(eng).export["max_len"] == 24
    assert sorted(p.name for p in eng.parent.iterdir()) == [".eng.lock", "eng", "eng.partial"]
    assert (eng.parent / ".eng.lock").read_text() == "a user's lock file"
    assert (eng.parent / "eng.partial" / "keep.txt").read_text() == "mine"
    assert oct(eng.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- item 2: one export at a time per --out, each in a temporary folder of its own ---------------------------------
def test_a_second_export_into_the_same_folder_is_refused_while_the_first_runs(small, tmp_path, capsys):
    out = tmp_path / "eng"
    first = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "export", "--model", str(small), "--out", str(out),
                              "--max-len", "16"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list(tmp_path.glob("eng*.partial")), first)
        code, err = export(capsys, "--model", str(small), "--out", str(out), "--max-len", "16")
        assert code == 2
        assert one_line(err) == f"dllm-trt: error: {out}: another export into it is running; wait for it to finish"
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    load_manifest(out)
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]  # no temporary folder, no lock file left


def wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- item 3: an interrupt stops the export and changes nothing ----------------------------------------------------
def test_an_interrupt_between_pieces_leaves_the_old_folder(small, eng, capsys, monkeypatch):
    def interrupt(out):
        raise KeyboardInterrupt
    before_piece(monkeypatch, 2, interrupt)
    before = snapshot(eng.parent)
    code, err = export(capsys, "--model", str(small), "--out", str(eng), "--max-len", "24")
    assert code == 130 and one_line(err) == "dllm-trt: error: interrupted"
    assert snapshot(eng.parent) == before


def test_an_interrupt_swallowed_inside_the_exporter_still_stops_it(small, eng, capsys, monkeypatch):
    """A Ctrl-C that lands inside torch's exporter can be caught there (its capture strategies retry after an
    error); the export must stop all the same."""
    def swallowed(out):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
    calls = before_piece(monkeypatch, 2, swallowed)
    before = snapshot(eng.parent)
    code, err = export(capsys, "--model", str(small), "--out", str(eng), "--max-len", "24")
    assert code == 130 and one_line(err) == "dllm-trt: error: interrupted"
    assert snapshot(eng.parent) == before
    assert len(calls) == 2  # it stopped after the piece in which the interrupt came


def test_ctrl_c_stops_an_export_started_with_sigint_ignored(small, eng):
    """A script's background job starts with SIGINT ignored; Ctrl-C (SIGINT) must still stop the export."""
    before = snapshot(eng.parent)
    proc = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "export", "--model", str(small), "--out", str(eng),
                             "--max-len", "24"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: any((d / "embed.onnx").exists() for d in eng.parent.glob("eng*.partial")), proc)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "dllm-trt: error: interrupted" and "Traceback" not in err
    assert snapshot(eng.parent) == before


def test_a_second_ctrl_c_stops_inside_a_piece(small, eng, capsys, monkeypatch):
    """The first Ctrl-C waits for the piece under way (see _Interrupts); a second one does not wait."""
    reached = []

    def twice(out):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        reached.append("the rest of the piece")
    before_piece(monkeypatch, 1, twice)
    before = snapshot(eng.parent)
    code, err = export(capsys, "--model", str(small), "--out", str(eng), "--max-len", "24")
    assert code == 130 and one_line(err) == "dllm-trt: error: interrupted" and reached == []
    assert snapshot(eng.parent) == before


def test_ctrl_c_is_live_before_the_exporter_is_even_imported(small, eng, capsys, monkeypatch):
    """torch's import alone takes seconds: SIGINT ignored at start must be undone before it, not after."""
    from dllm_trt.export import out_folder

    seen = []
    monkeypatch.setattr(out_folder, "export_into", lambda *a, **k: seen.append(signal.getsignal(signal.SIGINT)))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        export(capsys, "--model", str(small), "--out", str(eng))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.default_int_handler]


# ---- item 4: a full disk ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError(errno.ENOSPC)])
def test_a_full_disk_ends_with_one_line_and_leaves_no_partial_folder(small, eng, capsys, monkeypatch, error):
    def disk_full(out):
        (out / "half.onnx").write_bytes(b"x" * 1000)
        raise error
    before_piece(monkeypatch, 2, disk_full)
    before = snapshot(eng.parent)
    code, err = export(capsys, "--model", str(small), "--out", str(eng), "--max-len", "24")
    assert code == 2
    assert one_line(err) == f"dllm-trt: error: {eng}: export failed (No space left on device); nothing was changed"
    assert snapshot(eng.parent) == before


def test_a_full_disk_leaves_no_folder_it_created(small, tmp_path, capsys, monkeypatch):
    def disk_full(out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    before_piece(monkeypatch, 1, disk_full)
    code, err = export(capsys, "--model", str(small), "--out", str(tmp_path / "new" / "deeper" / "eng"))
    assert code == 2 and "No space left on device" in one_line(err)
    assert list(tmp_path.iterdir()) == []


# ---- item 5: an --out whose replacement would delete the wrong thing ------------------------------------------------
def symlink_to_engines(eng):
    (eng.parent / "link").symlink_to(eng, target_is_directory=True)
    return "link", "is a symbolic link"


def dangling_symlink(eng):
    (eng.parent / "link").symlink_to(eng.parent / "nowhere", target_is_directory=True)
    return "link", "is a symbolic link"


def the_current_folder(eng):
    os.chdir(eng)
    return ".", "is the current folder"


def a_folder_holding_the_current_one(eng):
    (eng / "trt").mkdir()
    os.chdir(eng / "trt")
    return "..", "holds the current folder"


def inside_an_engine_folder(eng):
    return str(eng / "sub"), "is inside the engine folder"


@pytest.mark.parametrize("case", [symlink_to_engines, dangling_symlink, the_current_folder,
                                  a_folder_holding_the_current_one, inside_an_engine_folder])
def test_an_out_whose_replacement_would_delete_the_wrong_thing_is_refused(small, eng, capsys, monkeypatch, case):
    monkeypatch.chdir(eng.parent)
    out, message = case(eng)
    before = snapshot(eng.parent)
    code, err = export(capsys, "--model", str(small), "--out", out)
    assert code == 2 and one_line(err).startswith(f"dllm-trt: error: {out}: {message}")
    assert snapshot(eng.parent) == before


def test_an_out_holding_the_checkpoint_is_refused(small, eng, capsys):
    model = eng / "model"
    shutil.copytree(small, model)
    before = snapshot(eng.parent)
    code, err = export(capsys, "--model", str(model), "--out", str(eng))
    assert code == 2
    assert one_line(err) == f"dllm-trt: error: {eng}: holds the checkpoint being exported; choose another --out"
    assert snapshot(eng.parent) == before


@pytest.mark.parametrize("flag,value,message", [
    ("--max-len", "0", "--max-len must be in 2..32, got 0"),
    ("--max-len", "-5", "--max-len must be in 2..32, got -5"),
    ("--max-active", "0", "--max-active must be in 1..32, got 0"),
])
def test_non_positive_sizes_are_refused(small, tmp_path, capsys, flag, value, message):
    code, err = export(capsys, "--model", str(small), "--out", str(tmp_path / "eng"), flag, value)
    assert code == 2 and one_line(err) == f"dllm-trt: error: {message}"
    assert list(tmp_path.iterdir()) == []
