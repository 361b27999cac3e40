"""The trainer with faults injected from outside the production code (tests/test_faults.py).

``SCALEJEPA_FAULTS`` is a comma list of faults; each acts on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` 0: a torchrun restart runs the plain trainer) and on rank
``SCALEJEPA_FAULT_RANK`` (default: every rank), at micro-step ``SCALEJEPA_FAULT_MICROSTEP``
or optimizer step ``SCALEJEPA_FAULT_STEP``:

* ``signal``: send ``SCALEJEPA_FAULT_SIGNAL`` (TERM, USR1) to this process, or with
  ``SCALEJEPA_FAULT_TARGET=parent`` to torchrun (which forwards it to every worker), as
  the micro-batch is fetched.
* ``signal_in_save``: send the same signal to this process again inside the DCP save.
* ``hold``: write ``SCALEJEPA_FAULT_DIR/ready`` as the micro-batch is fetched and wait
  there until ``SCALEJEPA_FAULT_DIR/go`` exists (the test acts while the run is alive).
* ``kill_in_save``: SIGKILL this process in the save of step ``SCALEJEPA_FAULT_STEP``: a
  sync save once its files are written (before the commit), an async one once staged.
* ``disk_full``: after the first checkpoint, limit files to ``SCALEJEPA_FAULT_FSIZE`` bytes
  (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG, as on a full disk).
* ``nan``: the fault rank's loss of optimizer step ``SCALEJEPA_FAULT_STEP`` (0-based) is NaN;
  at exit, every rank's ``SCALEJEPA_FAULT_DIR/rank<r>.optimizer_steps`` holds the
  optimizer steps it took.
"""

import atexit
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch.distributed.checkpoint as dcp

from scalejepa import checkpoint
from scalejepa.data import pipeline
from scalejepa.layout import step_of
from scalejepa.parallel.engine import TorchEngine
from scalejepa.train import main

env = os.environ
faults = set(filter(None, env.get("SCALEJEPA_FAULTS", "").split(",")))
rank = env.get("RANK", "0")
first_attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
active = first_attempt and env.get("SCALEJEPA_FAULT_RANK", rank) == rank
fault_dir = Path(env.get("SCALEJEPA_FAULT_DIR", "."))


def say(message: str) -> None:
    sys.stderr.write(f"fault injection, rank {rank}: {message}\n")
    sys.stderr.flush()


def fault_signal() -> signal.Signals:
    return signal.Signals[f"SIG{env.get('SCALEJEPA_FAULT_SIGNAL', 'TERM')}"]


if active and faults & {"signal", "hold"}:
    microstep = int(env.get("SCALEJEPA_FAULT_MICROSTEP", "0"))
    original_next = pipeline.SyntheticLoader.__next__

    def next_with_fault(self):
        if self.step == microstep and "hold" in faults:
            (fault_dir / "ready").write_text(str(os.getpid()))
            while not (fault_dir / "go").exists():
                time.sleep(0.05)
        if self.step == microstep and "signal" in faults:
            target = os.getppid() if env.get("SCALEJEPA_FAULT_TARGET") == "parent" else os.getpid()
            say(f"sending {fault_signal().name} to pid {target} at micro-step {microstep}")
            os.kill(target, fault_signal())
        return original_next(self)

    pipeline.SyntheticLoader.__next__ = next_with_fault

if active and faults & {"signal_in_save", "kill_in_save"}:
    kill_step = int(env.get("SCALEJEPA_FAULT_STEP", "-1"))
    original_save, original_async_save = dcp.save, dcp.async_save

    def save_with_fault(state, *, checkpoint_id, **kwargs):
        if "signal_in_save" in faults:
            say(f"sending a second {fault_signal().name} during the save of {checkpoint_id}")
            os.kill(os.getpid(), fault_signal())
        result = original_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if "kill_in_save" in faults and step_of(checkpoint_id) == kill_step:
            say(f"SIGKILL after writing {checkpoint_id}, before its commit")
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def async_save_with_fault(state, *, checkpoint_id, **kwargs):
        future = original_async_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if "kill_in_save" in faults and step_of(checkpoint_id) == kill_step:
            say(f"SIGKILL while the async save of {checkpoint_id} is in flight")
            os.kill(os.getpid(), signal.SIGKILL)
        return future

    dcp.save, dcp.async_save = save_with_fault, async_save_with_fault

if active and "disk_full" in faults:
    original_checkpoint_save = checkpoint.Checkpointer.save

    def save_then_fill_disk(self, *args, **kwargs):
        path = original_checkpoint_save(self, *args, **kwargs)
        limit = int(env["SCALEJEPA_FAULT_FSIZE"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        say(f"files are limited to {limit} bytes from now on")
        return path

    checkpoint.Checkpointer.save = save_then_fill_disk

if first_attempt and "nan" in faults:  # every rank counts its optimizer steps
    nan_step = int(env["SCALEJEPA_FAULT_STEP"])
    original_forward_backward, original_step = TorchEngine.forward_backward, TorchEngine.step
    optimizer_steps = [0]

    def forward_backward_with_nan(self, *args, **kwargs):
        loss = original_forward_backward(self, *args, **kwargs)
        return loss * float("nan") if active and optimizer_steps[0] == nan_step else loss

    def counted_step(self, *args, **kwargs):
        optimizer_steps[0] += 1
        return original_step(self, *args, **kwargs)

    TorchEngine.forward_backward, TorchEngine.step = forward_backward_with_nan, counted_step
    atexit.register(lambda: (fault_dir / f"rank{rank}.optimizer_steps").write_text(str(optimizer_steps[0])))

if __name__ == "__main__":
    sys.exit(main())
