"""Where an export lands: `--out` replaced only when it is provably one of our engine folders, through a temporary
sibling folder of this export's own, under a lock, so that an interrupted, failed or concurrent export leaves
nothing behind and changes nothing."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from dllm_trt.runtime.backends.tensorrt_backend import RUNTIME_CACHE
from dllm_trt.runtime.config import ModelError, read_json
from dllm_trt.runtime.manifest import FORMAT
from dllm_trt.runtime.trt_plans import BUILD_RECORD

from .onnx_export import TOKENIZER_FILES, check_out_dir, export_model


def not_an_engine_folder(folder: Path) -> str:
    """Why `folder` is not provably one of our engine folders, or '' when it is: a manifest.json in our format, and
    besides it only the files it lists, tokenizer files and the TensorRT plans `dllm-trt build` adds (trt/). Only
    such a folder may be replaced as a whole."""
    manifest = folder / "manifest.json"
    if manifest.is_symlink() or not manifest.is_file():
        return "is not empty and holds no engines"
    listed = _listed_files(_our_manifest(folder))
    if listed is None:
        return "holds a manifest.json that is not a dllm-trt manifest"
    others = sorted(e.name for e in folder.iterdir() if not _engine_entry(e, listed))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return f"holds files its manifest.json does not list ({shown})"
    return ""


def _our_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if path.is_symlink() or not path.is_file():
        return None
    try:
        raw = read_json(path, "")
    except ModelError:
        return None
    return raw if raw.get("format") == FORMAT else None


def _listed_files(raw: dict | None) -> set[str] | None:
    """The file names a manifest lists (any format version: an older export is replaced too), or None when it
    lists them in a way we never wrote."""
    if raw is None or not isinstance(raw.get("pieces"), list) or not isinstance(raw.get("tokenizer_files", []), list):
        return None
    names = {"manifest.json", *TOKENIZER_FILES}
    for p in raw["pieces"]:
        files = [p.get("file", ""), p.get("data_file", "")] if isinstance(p, dict) else [None]
        if not all(isinstance(f, str) for f in files):
            return None
        names.update(files)
    if not all(isinstance(f, str) for f in raw.get("tokenizer_files", [])):
        return None
    return (names | set(raw.get("tokenizer_files", []))) - {""}


def _engine_entry(entry: Path, listed: set[str]) -> bool:
    if entry.name == "trt" and entry.is_dir() and not entry.is_symlink():
        return _plan_folder(entry)
    return entry.name in listed and (entry.is_symlink() or entry.is_file())


def _plan_folder(trt: Path) -> bool:
    """trt/ as `dllm-trt build` leaves it (runtime/trt_plans.py): timing caches, and a folder of plans per target."""
    for e in trt.iterdir():
        name = _built_name(e.name)
        if e.is_symlink():
            return False
        if e.is_dir():
            if not all(_plan_file(f) for f in e.iterdir()):
                return False
        elif not (e.is_file() and name.startswith("timing-") and name.endswith(".cache")):
            return False
    return True


def _plan_file(f: Path) -> bool:
    name = _built_name(f.name)
    return not f.is_symlink() and f.is_file() and (name in (BUILD_RECORD, RUNTIME_CACHE) or name.endswith(".plan"))


def _built_name(name: str) -> str:
    """The file a temporary file of `dllm-trt build` (left by a build that was killed) was to become: <name>.partial,
    or .<name>.<random>.partial (trt_plans.replace_file); any other name as it is."""
    if not name.endswith(".partial"):
        return name
    name = name.removesuffix(".partial")
    return name[1:].rpartition(".")[0] if name.startswith(".") else name


def _destination(target: Path, model_dir: Path) -> Path:
    """`target`, refused when replacing it could delete what it must not: a symlink (never followed to replace its
    target), the current folder or the checkpoint being exported (or a folder holding them), a folder inside an
    engine folder."""
    if target.is_symlink():
        raise ModelError(f"{target}: is a symbolic link; choose a new --out or the folder it points to")
    real = target.resolve()
    for what, held in (("the current folder", _cwd()), ("the checkpoint being exported", model_dir.resolve())):
        if held is not None and (held == real or real in held.parents):
            raise ModelError(f"{target}: {'is' if held == real else 'holds'} {what}; choose another --out")
    engine = next((p for p in real.parents if _our_manifest(p) is not None), None)
    if engine is not None:
        raise ModelError(f"{target}: is inside the engine folder {engine}; choose an --out outside it")
    return real if target.name in ("", "..") else target  # a folder named by its own path, not by '..'


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was deleted: nothing to protect
        return None


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM stop an export, even where the process was started with SIGINT ignored (a
    background job of a script). The first one is remembered and the export stops at the next piece boundary (it
    checks after each piece and before replacing anything): raised inside torch's exporter, a KeyboardInterrupt can
    come out as another error (a lazy import left half done), be swallowed when the exporter retries with its next
    capture strategy, or be printed as a traceback from a weakref callback. A second one raises at once, except
    inside held() (cleanup, the final swap). Handlers can only be set from the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self.holding, self.previous = False, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum, frame):
        if not self.received:
            self.received = True
            print("\nstopping after the current piece (Ctrl-C again to stop at once)", file=sys.stderr)
        elif not self.holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _locked(target: Path):
    """One export at a time into `target`: a lock file beside it, held for the whole export and removed after. A
    second export is refused rather than sharing (or deleting) the first one's files."""
    lock = target.with_name(f".{target.name}.dllm-trt-export.lock")  # a name no user file of that folder has
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ModelError(f"{target}: another export into it is running; wait for it to finish") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the file now at that path
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _make_parents(folder: Path, made: list[Path]) -> None:
    """Create `folder` and its missing parents, adding those this call created to `made`, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        made.insert(0, d)


def _new_sibling(target: Path, suffix: str) -> Path:
    """A new empty folder beside `target` that no other process uses (created exclusively), with the permissions a
    plain mkdir gives (mkdtemp makes it private)."""
    d = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=suffix, dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    return d


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished export to `target`. An engine folder there is first renamed aside (onto an empty folder of
    our own: atomic, and a name no one else uses), put back if the move fails, and deleted after."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _new_sibling(target, ".old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_into(model_dir: str | Path, target: Path, **settings) -> Path:
    """Export into `target` through a temporary sibling folder of this export's own, so that an interrupted or
    failed export leaves nothing behind and changes nothing; an engine folder already at `target` is replaced as a
    whole, once the new export is complete. One export at a time per target."""
    target = _destination(Path(target), Path(model_dir))
    check_out_dir(target, not_an_engine_folder)
    made, interrupts = [], _Interrupts()
    try:
        with interrupts:
            _make_parents(target.parent, made)
            with _locked(target):
                check_out_dir(target, not_an_engine_folder)  # again: it may have changed while we waited
                _export_and_swap(model_dir, target, interrupts, settings)
    except BaseException as e:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        if interrupts.received or isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if isinstance(e, OSError):  # disk full, an I/O error: the machine's state, not a bug
            raise ModelError(f"{target}: export failed ({_reason(e)}); nothing was changed") from None
        raise
    return target


def _reason(e: OSError) -> str:
    code = e.errno if e.errno is not None else next((a for a in e.args if isinstance(a, int)), None)
    return e.strerror or (os.strerror(code) if code is not None else str(e))


def _export_and_swap(model_dir, target: Path, interrupts: _Interrupts, settings: dict) -> None:
    with interrupts.held():  # an interrupt now would lose track of the new folder
        tmp = _new_sibling(target, ".partial")
    try:
        interrupts.check()
        export_model(model_dir, tmp, shown_as=target, after_piece=interrupts.check, **settings)
        with interrupts.held():
            interrupts.check()
            check_out_dir(target, not_an_engine_folder)
            _swap_in(tmp, target)
    except BaseException:
        with interrupts.held():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
