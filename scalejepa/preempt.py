"""Preemption: a signal asks the run to stop at the next step boundary with a checkpoint.

Clusters announce the end of a job with a signal (SLURM: SIGTERM at preemption or the time
limit, or the signal chosen with ``sbatch --signal``). The handler only sets a flag; the
training step all-reduces it with the loss (:func:`scalejepa.step.train_step`, no extra
collective), so every rank sees the same decision at the same step boundary, even when
only one rank got the signal. The trainer then commits a checkpoint, writes the
``PREEMPTED`` marker into the run directory (durably, after the checkpoint), and exits
with :data:`PREEMPTED_EXIT_CODE`.

torchrun's exit status does not carry its workers' statuses, so launch scripts look for
the marker: it exists after a run exits only if that run was preempted (a run removes it
when it starts). A worker group that torchrun restarts after a preemption finds the marker
and exits at once with the same code, instead of training on inside a dying allocation.

Signals that arrive while the checkpoint is written only set the flag again: the save is
never interrupted by the handler (an abrupt kill during a save leaves an uncommitted
directory, which resume ignores).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from scalejepa.io import atomic_write_text
from scalejepa.layout import RunDir

log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "try again later", which is what a preempted run asks for.
PREEMPTED_EXIT_CODE = 75


def parse_signals(names: str) -> list[signal.Signals]:
    """``"SIGTERM,SIGUSR1"`` -> signals; a ValueError names an unknown or unusable one
    (``scalejepa.config.TrainConfig`` reports it as a config error when built, before any work)."""
    found = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        full = name if name.startswith("SIG") else f"SIG{name}"
        sig = getattr(signal.Signals, full, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(
                f"train.preempt_signals: {name!r} is not a signal a process can handle; "
                "use names like SIGTERM,SIGUSR1 (or an empty string for none)"
            )
        found.append(sig)
    return found


class PreemptionFlag:
    """Installs the handlers for ``signals`` (restored by :meth:`close`) and records the
    first signal that arrived."""

    def __init__(self, signals: list[signal.Signals]):
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("%s received: stopping after this step with a checkpoint", self.received.name)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def write_marker(run: RunDir, step: int, checkpoint: Path, received: signal.Signals | None) -> Path:
    record = {"step": step, "checkpoint": str(checkpoint), "signal": received.name if received else "peer",
              "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    return atomic_write_text(run.preempted, json.dumps(record) + "\n")


def restarted_after_preemption(run: RunDir) -> dict | None:
    """The marker's record when torchrun restarts a worker group whose previous attempt was
    preempted (``TORCHELASTIC_RESTART_COUNT`` > 0 and a marker in the run directory)."""
    marker = run.preempted
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 or not marker.is_file():
        return None
    return json.loads(marker.read_text())
