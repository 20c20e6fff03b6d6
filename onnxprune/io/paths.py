"""Output paths: check them before any work, create their missing folders, and leave nothing behind on failure.

Every file the CLI writes (a model, a JSON report, a plot, a sweep's folder) goes through here. Like the genai
model builder or Hugging Face's exporters, onnxprune creates the folder it writes into; what it refuses is an
existing file without --overwrite, and a folder that cannot be made (a file in the way, no permission), which is
said in one line before anything runs. A run that fails afterwards removes the folders it created (when they
are still empty: the writers themselves are atomic, so a failed write leaves no file in them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from onnxprune.errors import InputError
from onnxprune.io.weights import Workspace


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """The folders above `path` that do not exist yet, outermost first."""
    missing = []
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def check_output(path: str | os.PathLike, *, overwrite: bool = True, what: str = "output") -> Path:
    """Refuse, before any work, an output that cannot be written: an existing file without `overwrite`, a folder
    where the file should go, or a parent folder that cannot be created. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {what} {path}: it is a folder; give a file name")
    if path.exists() and not overwrite:
        raise InputError(f"output exists: {path} (pass --overwrite to replace it)")
    _check_creatable(path.absolute().parent, path, what)
    return path


def check_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Like `check_output` for a folder the run writes into (a sweep's -o): it may exist, or be creatable."""
    folder = Path(folder)
    _check_creatable(folder.absolute(), folder, what)
    return folder


def _check_creatable(folder: Path, path: Path, what: str) -> None:
    """`folder` exists, or its nearest existing ancestor is a folder we may write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} {path}: no permission to write in {existing}")


def make_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """Create the folders above `path` that are missing; a folder that cannot be made is an InputError."""
    make_folder(Path(path).absolute().parent, what)
    return Path(path)


def make_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"cannot create folder {folder} for {what}: a file is in the way") from None
    except OSError as exc:
        raise InputError(f"cannot create folder {folder} for {what}: {exc.strerror or exc}") from None
    return folder


@contextlib.contextmanager
def output_folders(*paths: str | os.PathLike | None, folders: tuple = ()) -> Iterator[None]:
    """Around a run that writes `paths` (files) and `folders`. When it ends, the scratch folders of rewrites
    made beside its outputs (io.weights.Workspace) are removed; when it fails, so are the folders above its
    outputs that did not exist when it started, innermost first, as long as they are empty."""
    targets = {Path(p).absolute().parent for p in paths if p is not None}
    targets |= {Path(f).absolute() for f in folders if f is not None}
    created = sorted({f for t in targets for f in missing_folders(t / "_")}, key=lambda p: len(p.parts),
                     reverse=True)
    failed = True
    try:
        yield
        failed = False
    finally:
        for workspace in list(Workspace._open):
            if workspace.path.absolute().parent in targets:
                workspace.close()
        for folder in created if failed else ():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty folders go; anything in them stays
