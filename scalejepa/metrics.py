"""Run metrics: one JSON object per log step in metrics.jsonl, the same scalars in
TensorBoard (``RUN/tb``). Only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            self._drop_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the events a crashed run wrote past the checkpoint we resume from.
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, step: int, scalars: dict[str, float], extra: dict | None = None) -> None:
        """``scalars`` go to TensorBoard under their names (``train/loss``) and to the
        JSON line under their last component (``loss``); ``extra`` only to the JSON line."""
        if not self.enabled:
            return
        record = {"step": step}
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
            record[name.rsplit("/", 1)[-1]] = value
        record.update(extra or {})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
