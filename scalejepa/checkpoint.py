"""Checkpoints: one directory per step, written with torch.distributed.checkpoint (DCP).

``RUN/checkpoints/step_00001000/`` holds the sharded state of every rank (models, target
encoder, optimizer) and the trainer state (step, config, per-rank data positions and RNG
states). A directory counts only once its commit marker exists: the marker is written
(temp file + rename) after every rank finished writing, so a crash mid-save leaves an
uncommitted directory that resume ignores and the next save cleans up. The same format
serves one process and many, and DCP reshards on load, so a run may resume on a
different world size.

A backend with its own checkpoint format (DeepSpeed) passes ``writer``/``reader``
functions that fill the step directory; directories, commit markers, pruning and errors
stay the same.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def is_committed(path: Path) -> bool:
    return (Path(path) / COMMIT_MARKER).is_file()


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step_00001000)")
    return int(match.group(1))


def committed_checkpoints(folder: Path) -> list[Path]:
    """Committed step directories, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and is_committed(p)]
    return sorted(found, key=step_of)


@contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes a single process" when no process group exists: that is
    exactly the intent of a one-process run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Checkpointer:
    def __init__(self, folder: str | Path, keep: int = 3, async_save: bool = False):
        self.folder = Path(folder)
        self.keep = keep
        self.async_save = async_save
        self._pending = None  # (future, path, step) of an async save in flight
        self._async_group = None

    def _async_process_group(self):
        """Async saves coordinate on their own gloo group: the save thread's collectives
        must not interleave with the training collectives of the main thread (and DCP
        needs a CPU backend, which an NCCL-only default group lacks). Created on the first
        save, which every rank reaches at the same step."""
        if self._async_group is None and dist.is_available() and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def latest(self) -> Path | None:
        found = committed_checkpoints(self.folder)
        return found[-1] if found else None

    def save(self, step: int, state: dict, writer: Callable[[dict, Path], Any] | None = None) -> Path:
        """Write ``state`` for ``step``. With async_save this returns once the state is
        staged; call :meth:`wait` (done before the next save, and by the trainer before
        the next optimizer step) to commit it. ``writer(state, path)``: write with another
        format than DCP (synchronously), e.g. DeepSpeed's own."""
        self.wait()
        path = self.folder / f"step_{step:08d}"
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an uncommitted leftover of a crashed save, or a rerun of this step
                shutil.rmtree(path)
        _barrier()
        if writer is not None:
            writer(state, path)
            self._commit(path, step)
            return path
        with _single_process_quiet():
            if self.async_save:
                future = dcp.async_save(state, checkpoint_id=str(path), process_group=self._async_process_group())
                self._pending = (future, path, step)
            else:
                dcp.save(state, checkpoint_id=str(path))
        if not self.async_save:
            self._commit(path, step)
        return path

    def wait(self) -> None:
        if self._pending is None:
            return
        future, path, step = self._pending
        self._pending = None
        future.result()
        self._commit(path, step)

    def _commit(self, path: Path, step: int) -> None:
        _barrier()  # every rank has written its shards
        if _rank() == 0:
            marker = path / COMMIT_MARKER
            tmp = path / f".{COMMIT_MARKER}.tmp"
            tmp.write_text(json.dumps({"step": step, "time": time.time()}))
            os.replace(tmp, marker)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        committed = committed_checkpoints(self.folder)
        for old in committed[: -self.keep]:
            shutil.rmtree(old, ignore_errors=False)
        newest = step_of(committed[-1]) if committed else -1
        for leftover in self.folder.iterdir():
            if _STEP_DIR.match(leftover.name) and not is_committed(leftover) and step_of(leftover) < newest:
                shutil.rmtree(leftover)

    def load(self, path: str | Path, state: dict, reader: Callable[[dict, Path], Any] | None = None) -> None:
        """Load into ``state`` in place. Anything wrong is an error, never a fresh start.
        ``reader(state, path)``: the counterpart of :meth:`save`'s ``writer``."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not is_committed(path):
            raise CheckpointError(
                f"checkpoint {path} has no {COMMIT_MARKER} marker: its save did not finish. "
                f"Resume from an earlier step directory, or with --resume auto (which skips it)"
            )
        try:
            with _single_process_quiet():
                if reader is not None:
                    reader(state, path)
                else:
                    dcp.load(state, checkpoint_id=str(path))
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException
            raise CheckpointError(f"could not load checkpoint {path}: {exc}") from exc
