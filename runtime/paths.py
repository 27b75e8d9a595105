"""Files named by a manifest, an index or a tokenizer listing must stay inside their folder."""
from __future__ import annotations

from pathlib import Path

from .config import ModelError


def inside(folder: str | Path, name: str, what: str, root: str | Path | None = None) -> Path:
    """folder/name, refused with one ModelError line when `name` is absolute, climbs out with '..', or resolves
    (through symlinks) to somewhere outside `root` (default: `folder`)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise ModelError(f"{folder}: {what} has no file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or "\0" in name:
        raise ModelError(f"{folder}: {what} '{name}' must be a plain path inside the folder")
    path = folder / rel
    if not path.resolve().is_relative_to(Path(root or folder).resolve()):
        raise ModelError(f"{folder}: {what} '{name}' leads outside the folder (symlink to {path.resolve()})")
    return path


def hub_root(folder: str | Path) -> Path:
    """The folder symlinks may point into: a Hugging Face hub snapshot (models--org--name/snapshots/REV) links its
    files to ../../blobs, so its repository folder; any other folder is its own root."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder
