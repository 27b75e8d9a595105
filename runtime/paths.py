"""Files named by a manifest, an index or a tokenizer listing must stay inside their folder."""
from __future__ import annotations

from pathlib import Path

from .config import ModelError


def inside(folder: str | Path, name: str, what: str) -> Path:
    """folder/name, refused with one ModelError line when `name` is absolute, climbs out with '..', or resolves
    (through symlinks) to somewhere outside `folder`."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise ModelError(f"{folder}: {what} has no file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ModelError(f"{folder}: {what} '{name}' must be a plain path inside the folder")
    path = folder / rel
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise ModelError(f"{folder}: {what} '{name}' leads outside the folder (symlink to {path.resolve()})")
    return path
