"""Outputs that appear whole or not at all: written under a hidden temporary name beside the destination, renamed
into place when complete, removed on any failure.

A file is replaced in one rename (``os.replace``). A folder (a DICOM series) cannot be: with ``overwrite`` the old
folder is first renamed to a hidden name, the new one renamed into place, then the old one deleted; a crash between
the two renames leaves the old series under its hidden name, never half a series under the output's name. Hidden
names are what the readers skip (:func:`client.data.files.is_ignored`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from client.inference.errors import InferenceError


class StagedOutput:
    """A temporary file or folder (``temp``) that becomes ``destination`` on :meth:`commit`.

    Use as a context manager: leaving it by an exception before :meth:`commit` removes ``temp``. Refuses an existing
    ``destination`` unless ``overwrite``.
    """

    def __init__(self, destination: Path, *, folder: bool, overwrite: bool) -> None:
        refuse_existing(destination, overwrite)
        destination.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = f".{destination.name}.", ".partial"
        self.destination = destination
        self.folder = folder
        if folder:
            self.temp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=destination.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=destination.parent)
            os.close(handle)
            self.temp = Path(name)
        self.temp.chmod((0o777 if folder else 0o666) & ~_umask())  # as a plain open/mkdir would (mk*temp: private)
        self._committed = False

    def commit(self) -> Path:
        """Move the finished ``temp`` to ``destination`` (replacing what is there) and make it durable."""
        _fsync_tree(self.temp)
        if self.folder and self.destination.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.", suffix=".old",
                                        dir=self.destination.parent))
            os.replace(self.destination, old / self.destination.name)
            os.replace(self.temp, self.destination)
            shutil.rmtree(old)
        else:
            os.replace(self.temp, self.destination)
        _fsync_tree(self.destination.parent, recursive=False)
        self._committed = True
        return self.destination

    def discard(self) -> None:
        """Remove ``temp`` (nothing to do after :meth:`commit`)."""
        if self._committed:
            return
        if self.folder:
            shutil.rmtree(self.temp, ignore_errors=True)
        else:
            self.temp.unlink(missing_ok=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()


def refuse_existing(destination: Path, overwrite: bool) -> None:
    """:class:`InferenceError` when ``destination`` exists and may not be replaced."""
    if destination.exists() and not overwrite:
        raise InferenceError(destination, "already exists", "choose another output, or pass --overwrite")


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(path: Path, *, recursive: bool = True) -> None:
    """fsync a file, or a folder's entries (and with ``recursive`` its files) so a rename after it is durable."""
    targets = [path]
    if path.is_dir() and recursive:
        targets = [*path.iterdir(), path]
    for target in targets:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
