"""Result files of eval, bench and calibrate (--out, --plot): checked before a long run, written whole or not at all,
and never lost after it."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path


class OutputError(Exception):
    """An output file that cannot be written where the user asked (one line)."""


def check_output(path: str | None, flag: str, inputs: tuple = ()) -> None:
    """Refuse, before the run, an output that cannot be written (its folder missing or not writable, a folder in its
    place) or that would overwrite one of the run's inputs (the data file, a file of the model or engine folder).
    Writability is probed by creating a file beside it: permission bits alone say nothing to root."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; give a file name")
    target = p.resolve()
    for source in inputs:
        if not source:
            continue
        src = Path(source).resolve()
        if target == src or src in target.parents:
            raise OutputError(f"{flag} {path}: would overwrite the input {source}; choose another file")
    try:
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".probe"):
            pass
        if p.exists():
            with open(p, "ab"):
                pass
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot be written ({e.strerror or e})") from None


def check_plot(path: str | None, flag: str = "--plot", inputs: tuple = ()) -> None:
    """check_output, plus a file type matplotlib can write (it would otherwise fail after the run, or silently add
    .png to a name without one)."""
    if not path:
        return
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise OutputError(f"{flag} needs matplotlib: pip install matplotlib") from None
    kinds = FigureCanvasAgg.get_supported_filetypes()
    if Path(path).suffix[1:].lower() not in kinds:
        raise OutputError(f"{flag} {path}: the file name must end in one of {', '.join('.' + k for k in sorted(kinds))}")
    check_output(path, flag, inputs)


def save(path: str, what: str, write) -> bool:
    """write(file) into a new file beside `path`, then moved onto it, so that a failure leaves no truncated file.
    When that fails (after a long run), the result goes to a temporary file, said on stderr, and False is
    returned so that the command can end with a non-zero status."""
    p = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=p.suffix)
        os.close(fd)
        write(tmp)
        os.replace(tmp, p)
        print(f"{what} saved to {path}", file=sys.stderr)
        return True
    except OSError as e:
        reason = e.strerror or str(e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        fd, fallback = tempfile.mkstemp(prefix="dllm-trt-", suffix=p.suffix)
        os.close(fd)
        write(fallback)
    except OSError as e:
        raise OutputError(f"could not write {path} ({reason}) nor a temporary file ({e.strerror or e})") from None
    print(f"dllm-trt: could not write {path} ({reason}); {what} saved to {fallback} instead", file=sys.stderr)
    return False

