"""Durable file writes: a file counts only once it is complete, on disk, and named.

Every write goes to a temporary file in the destination's directory, is flushed and
fsynced, then renamed over the destination (atomic on POSIX), and the directory is
fsynced so the rename itself survives a crash. A reader therefore sees the old file or
the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: str | Path) -> None:
    """Make the directory entries of ``path`` (renames, new files) durable."""
    dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under ``path`` (for writers that do not fsync)."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], mode: int = 0o666) -> Path:
    """``write(file)`` into a temp file next to ``path``, then fsync + rename + fsync dir.
    On any error the temp file is removed and ``path`` is untouched. ``mode``: the new
    file's permissions before the umask (0o777 for a script)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    # O_EXCL: never write into another writer's temp file; the umask applies to ``mode``
    # as for any new file (tempfile.mkstemp would make it owner-only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str, mode: int = 0o666) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), mode)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, one trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch  # here: ~2 s to import, and config and the shard writers use this module without it

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_dir(path: str | Path, fill: Callable[[Path], Any]) -> Path:
    """``fill(folder)`` writes a directory's files into a temp folder next to ``path``; they
    are fsynced and the folder renamed to ``path``, which must not exist or be empty. On any
    error the temp folder is removed and ``path`` is untouched."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not an empty directory: choose a new one or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        fill(tmp)
        fsync_tree(tmp)
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path
