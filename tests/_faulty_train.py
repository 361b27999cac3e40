"""The trainer, except that one rank dies abruptly on the first attempt (a test of restarts).

``SCALEJEPA_TEST_FAULT_RANK`` exits with status 17 (``os._exit``: no clean-up, like a
crash or a killed node) as it fetches the batch of micro-step
``SCALEJEPA_TEST_FAULT_MICROSTEP``, but only while ``TORCHELASTIC_RESTART_COUNT`` is 0:
torchrun's restart runs the plain trainer, which resumes from the last checkpoint.
"""

import os
import sys

from scalejepa.data import pipeline
from scalejepa.train import main

if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and \
        os.environ.get("RANK") == os.environ["SCALEJEPA_TEST_FAULT_RANK"]:
    fault_at = int(os.environ["SCALEJEPA_TEST_FAULT_MICROSTEP"])
    original = pipeline.SyntheticLoader.__next__

    def faulty_next(self):
        if self.step == fault_at:
            sys.stderr.write(f"rank {os.environ['RANK']}: simulated crash at micro-step {fault_at}\n")
            sys.stderr.flush()
            os._exit(17)
        return original(self)

    pipeline.SyntheticLoader.__next__ = faulty_next

if __name__ == "__main__":
    sys.exit(main())
