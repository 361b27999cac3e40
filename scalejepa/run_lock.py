"""One run per run directory: rank 0 holds an exclusive ``flock`` on ``RUN/run.lock``.

Two runs on one directory would interleave their checkpoints, metrics and commit markers.
The kernel releases a ``flock`` when its holder dies, however it dies, so a lock left by a
crashed run is stale by construction: the next run takes it over and says whose it was
(the file records host, pid and start time). A clean exit removes the file. On Linux NFS
clients ``flock`` is carried by POSIX byte-range locks, which the server arbitrates between
nodes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    pass


def _describe(record: str) -> str:
    try:
        holder = json.loads(record)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["time"]))
        return f"pid {holder['pid']} on host {holder['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no record"


class RunLock:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by another run ({_describe(holder)}); two runs on "
                f"one directory would interleave their checkpoints. Wait for it to end, stop it, or pass another "
                f"--run-dir"
            ) from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        if previous:
            log.warning("stale lock %s of %s: that run ended without releasing it (a crash or a kill); taking over",
                        self.path, _describe(previous))
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the file while still holding the lock, then release it."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
