"""Checkpoints: what a run saves, how it commits, and how it comes back.

One owner for the run state (torchtitan's ``components/checkpoint.py`` pattern):

* :class:`TrainState` is everything of the trainer that a resume needs besides the
  models: the step, and for every rank its data position and RNG states. It is a DCP
  ``Stateful`` of tensors, saved next to the engine's state (no JSON or pickle blobs).
  Per-rank entries live under ``rank_<r>`` keys, so DCP keeps one copy per rank.
* :class:`Checkpointer` writes ``RUN/checkpoints/step_XXXXXXXX/`` (names in
  :mod:`scalejepa.layout`): the engine's files if it has a format of its own (DeepSpeed),
  then one DCP save of the engine's sharded state and the train state, the config, and
  last the commit marker (durably, after every rank finished). A crash mid-save leaves
  an uncommitted directory that resume ignores and a later save removes. The marker counts
  only once the step directory's files and entries are on disk (DCP fsyncs its files; the
  step directory and its parent are fsynced before the marker is written). DCP reshards on
  load, so FSDP2 runs may resume on another world size (data streams then restart from
  fresh seeds: per-rank positions do not carry over to other ranks).

Faults: a save that runs out of space (ENOSPC, EFBIG from a file-size limit, EDQUOT) is a
:class:`CheckpointError` naming the step directory and the bytes this rank needed, and
its partial directory is removed (earlier checkpoints are untouched). A committed
checkpoint whose DCP files are missing or shorter than its ``.metadata`` says is an error
naming the file, before anything loads (:meth:`Checkpointer.verify`).
"""

from __future__ import annotations

import errno
import json
import logging
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.stateful import Stateful

from scalejepa.data.pipeline import LoaderState
from scalejepa.io import atomic_write_text, fsync_dir, fsync_tree
from scalejepa.layout import (
    COMMIT_MARKER,
    CONFIG_FILE,
    TRAIN_STATE_KEY,
    committed_step_dirs,
    is_committed,
    step_dir_name,
    step_of,
)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- train state


def _python_rng_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    version, internal, gauss = random.getstate()
    return torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64), \
        torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)


def _set_python_rng(ints: torch.Tensor, gauss: torch.Tensor) -> None:
    values = ints.tolist()
    random.setstate((values[0], tuple(values[1:-1]), None if values[-1] < 0 else float(gauss[0])))


def _numpy_rng_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return torch.from_numpy(key.astype(np.int64)), torch.tensor([pos, has_gauss], dtype=torch.int64), \
        torch.tensor([gauss], dtype=torch.float64)


def _set_numpy_rng(key: torch.Tensor, pos: torch.Tensor, gauss: torch.Tensor) -> None:
    p, has_gauss = pos.tolist()
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), p, has_gauss, float(gauss[0])))


class TrainState(Stateful):
    """Step, and this rank's data position and RNG states (Python, NumPy, torch, CUDA).

    ``data``: the loader's :class:`~scalejepa.data.pipeline.LoaderState` (kept by
    reference: the loader updates it in place). ``with_rank_state=False`` leaves the
    per-rank entries out of the next load: for a checkpoint written by another number of
    ranks (:meth:`Checkpointer.written_by`), whose data positions belong to other ranks."""

    def __init__(self, rank: int = 0, world_size: int = 1, *, with_rank_state: bool = True):
        self.rank, self.world_size = rank, world_size
        self.with_rank_state = with_rank_state
        self.step = 0
        self.data = None  # LoaderState | None

    def _rank_state(self) -> dict[str, torch.Tensor]:
        python_ints, python_gauss = _python_rng_tensors()
        numpy_key, numpy_pos, numpy_gauss = _numpy_rng_tensors()
        state = {"rng_python": python_ints, "rng_python_gauss": python_gauss, "rng_numpy_key": numpy_key,
                 "rng_numpy_pos": numpy_pos, "rng_numpy_gauss": numpy_gauss, "rng_torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        state["data_streams"] = [] if self.data is None else self.data.to_rows()
        return state

    def state_dict(self) -> dict:
        state = {"step": torch.tensor(self.step), "world_size": torch.tensor(self.world_size)}
        if self.with_rank_state:
            state[f"rank_{self.rank}"] = self._rank_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        mine = state.get(f"rank_{self.rank}")
        self.with_rank_state, self.data = True, None  # every later save writes this rank's state
        if mine is None:
            return
        _set_python_rng(mine["rng_python"], mine["rng_python_gauss"])
        _set_numpy_rng(mine["rng_numpy_key"], mine["rng_numpy_pos"], mine["rng_numpy_gauss"])
        torch.set_rng_state(mine["rng_torch"])
        if "rng_cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["rng_cuda"])
        if mine["data_streams"]:
            self.data = LoaderState.from_rows(mine["data_streams"])


# ----------------------------------------------------------------------------- checkpointer


@contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes a single process" when no process group exists: that is
    exactly the intent of a one-process run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
DCP_METADATA_FILE = ".metadata"


def _no_space_cause(exc: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``exc`` (DCP wraps each rank's error in a
    CheckpointException), or None."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return current
        if isinstance(current, CheckpointException):
            pending.extend(failure for failure, _ in current.failures.values())
        pending.extend((current.__cause__, current.__context__))
    return None


def _local_bytes(state) -> int:
    """Bytes of the tensors this rank writes (the local shards of sharded tensors)."""
    if isinstance(state, Stateful):
        state = state.state_dict()
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def read_commit(step_dir: Path) -> dict:
    """The commit marker's record: ``step``, ``world_size``, ``time``."""
    return json.loads((Path(step_dir) / COMMIT_MARKER).read_text())


class Checkpointer:
    def __init__(self, folder: str | Path, keep: int = 3, async_save: bool = False):
        self.folder = Path(folder)
        self.keep = keep
        self.async_save = async_save
        self._pending = None  # (future, path, step, config_text) of an async save in flight
        self._async_group = None

    def _async_process_group(self):
        """Async saves coordinate on their own gloo group: the save thread's collectives
        must not interleave with the training collectives of the main thread (and DCP
        needs a CPU backend, which an NCCL-only default group lacks). Created on the first
        save, which every rank reaches at the same step."""
        if self._async_group is None and _distributed():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def latest(self) -> Path | None:
        found = committed_step_dirs(self.folder)
        return found[-1] if found else None

    def save(self, step: int, engine, train_state: TrainState, config_text: str) -> Path:
        """Write ``step``: the engine's own files (if any), then its DCP state and the train
        state, the config, and the commit marker. With async_save this returns once the
        state is staged; :meth:`wait` (called before the next save, and by the trainer
        before the next optimizer step) commits it."""
        self.wait()
        path = self.folder / step_dir_name(step)
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an uncommitted leftover of a crashed save, or a rerun of this step
                shutil.rmtree(path)
        _barrier()
        train_state.step = step
        state = {**engine.checkpoint_state(), TRAIN_STATE_KEY: train_state}
        try:
            engine.save_files(path)
            with _single_process_quiet():
                if self.async_save and not engine.writes_own_files:
                    future = dcp.async_save(state, checkpoint_id=str(path), process_group=self._async_process_group())
                    self._pending = (future, path, step, config_text, state)
                    return path
                dcp.save(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException
            self._raise_save_error(exc, path, state)
        self._commit(path, step, config_text, fsync_files=engine.writes_own_files)
        return path

    def wait(self) -> None:
        if self._pending is None:
            return
        future, path, step, config_text, state = self._pending
        self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as exc:
            self._raise_save_error(exc, path, state)
        self._commit(path, step, config_text)

    def _raise_save_error(self, exc: BaseException, path: Path, state: dict):
        """Out of space: remove the partial directory and say what was needed; anything
        else propagates as it is."""
        cause = _no_space_cause(exc)
        if cause is None:
            raise exc
        shutil.rmtree(path, ignore_errors=True)  # every rank: the partial files are useless
        free = shutil.disk_usage(self.folder).free
        needed = _local_bytes(state)
        raise CheckpointError(
            f"no space to save checkpoint {path}: {cause.strerror} ({cause.filename or path}). This rank writes "
            f"~{needed / 2**20:.1f} MiB ({needed} bytes), {free / 2**20:.1f} MiB are free there (a file-size "
            f"limit, ulimit -f, or a quota can be lower). The partial checkpoint was removed; earlier checkpoints "
            f"are intact: free space (or lower checkpoint.keep) and continue with --resume auto"
        ) from cause

    def _commit(self, path: Path, step: int, config_text: str, fsync_files: bool = False) -> None:
        if fsync_files:  # engines with files of their own (DeepSpeed) do not fsync them; DCP does
            fsync_tree(path)
        _barrier()  # every rank has written its files
        if _rank() == 0:
            fsync_dir(path)  # the files' directory entries, then the step directory's own
            fsync_dir(path.parent)
            atomic_write_text(path / CONFIG_FILE, config_text)
            record = {"step": step, "world_size": _world_size(), "time": time.time()}
            atomic_write_text(path / COMMIT_MARKER, json.dumps(record))
            self._prune()
        _barrier()

    def _prune(self) -> None:
        committed = committed_step_dirs(self.folder)
        for old in committed[: -self.keep]:
            shutil.rmtree(old)
        newest = step_of(committed[-1]) if committed else -1
        for leftover in self.folder.iterdir():
            step = step_of(leftover)
            if step is not None and step < newest and not is_committed(leftover):
                shutil.rmtree(leftover)

    @staticmethod
    def check_committed(path: str | Path) -> Path:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if step_of(path) is None:
            raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step_00001000)")
        if not is_committed(path):
            raise CheckpointError(
                f"checkpoint {path} has no {COMMIT_MARKER} marker: its save did not finish. "
                f"Resume from an earlier step directory, or with --resume auto (which skips it)"
            )
        return path

    @staticmethod
    def written_by(path: str | Path) -> int:
        """How many ranks wrote the committed checkpoint ``path``."""
        return int(read_commit(Checkpointer.check_committed(path))["world_size"])

    @staticmethod
    def verify(path: str | Path) -> None:
        """Every DCP file that ``.metadata`` refers to exists and is long enough, else a
        CheckpointError naming the file. ``--resume auto`` does not fall back to an older
        checkpoint on this error: a damaged committed checkpoint means the storage lost data
        after the commit, which a person should look at, and a silent fallback would discard
        its steps; the message lists the older checkpoints to resume from explicitly."""
        path = Path(path)
        older = [str(p) for p in committed_step_dirs(path.parent) if step_of(p) < step_of(path)]
        fix = (f"restore the file, or resume from an older checkpoint with --resume {older[-1]}" if older
               else "restore the file, or start over in a new --run-dir (no older checkpoint exists)")
        damaged = f"could not load checkpoint {path}, it is damaged:"
        metadata_file = path / DCP_METADATA_FILE
        if not metadata_file.is_file():
            raise CheckpointError(f"{damaged} {metadata_file} is missing; {fix}")
        needed: dict[str, int] = {}
        for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{damaged} shard file {file} is missing; {fix}")
            actual = file.stat().st_size
            if actual < size:
                raise CheckpointError(f"{damaged} shard file {file} is truncated ({actual} bytes, its .metadata "
                                      f"needs {size}); {fix}")

    def load(self, path: str | Path, engine, train_state: TrainState) -> None:
        """Load ``path`` into the engine and ``train_state`` in place. Anything wrong is an
        error naming the checkpoint (or its damaged file), never a fresh start."""
        path = self.check_committed(path)
        self.verify(path)
        try:
            engine.load_files(path)
            state = {**engine.checkpoint_state(), TRAIN_STATE_KEY: train_state}
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(path))
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException
            raise CheckpointError(f"could not load checkpoint {path}: {exc}") from exc
