"""The run directory: what a training run writes where, named once.

::

    RUN/config.yaml                     the resolved config
    RUN/metrics.jsonl, RUN/tb/          one JSON line / TensorBoard scalars per log step
    RUN/checkpoints/step_00001000/      one directory per checkpoint (see scalejepa.checkpoint)
        COMMITTED                       written last: the directory counts only with it
        config.yaml                     the config that wrote it (the step directory describes itself)
        .metadata, *.distcp             DCP: models, optimizer and train state
        deepspeed/..., target_encoder.pt, scalejepa_deepspeed.json   DeepSpeed runs instead
    RUN/export/target_encoder.pt        plain target-encoder weights + .json sidecar (scalejepa.export)
    RUN/init_from.json                  the weights the run started from (--init-from; scalejepa.init_from)
    RUN/profile/rank<r>.*.pt.trace.json torch.profiler traces (profile.enabled)
    RUN/run.lock                        held by rank 0 while a run is alive (scalejepa.run_lock)
    RUN/PREEMPTED                       the last run stopped on a signal, with a checkpoint (scalejepa.preempt)

A sweep directory (``scalejepa-sweep``) holds one run directory per planned run::

    SWEEP/plan.json                     the planned runs and jobs (scalejepa.sweep.records)
    SWEEP/runs/NAME/                    a run directory as above, plus what the sweep writes in it:
        sweep_result.json               written last, when the run is trained and probed: it is finished
        sweep.log                       the training and probe commands and their output
        probe_knn.json, probe_linear.json   the probes' results
    SWEEP/runs.jsonl                    one row per finished run (scalejepa-sweep collect)
    SWEEP/fit.json, SWEEP/forecast.json the fitted laws, the forecast of the largest budget
    SWEEP/report/                       plots and summary.md
    SWEEP/logs/job_0000.log             each local worker's output (slurm-%A_%a.out: each array task's)
    SWEEP/slurm/sweep.sbatch            the SLURM array script

Training, evaluation, export and sweeps all read these names from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
EXPORT_FILE = "target_encoder.pt"
PROFILE_DIR = "profile"
LOCK_FILE = "run.lock"
PREEMPTED_MARKER = "PREEMPTED"
INIT_FROM_FILE = "init_from.json"

COMMIT_MARKER = "COMMITTED"
STEP_DIR_PATTERN = re.compile(r"^step_(\d{8})$")

# Top-level entries of a DCP checkpoint. The trained I-JEPA module (``encoder.*``,
# ``predictor.*``), the target encoder, the optimizer, and the train state.
MODEL_KEY = "model"
TARGET_KEY = "target"
OPTIM_KEY = "optim"
TRAIN_STATE_KEY = "train_state"

# DeepSpeed step directories: DeepSpeed's own files under ``deepspeed/``, the target
# encoder as a full state dict, and what the checkpoint needs to resume.
DEEPSPEED_SUBDIR = "deepspeed"
DEEPSPEED_TARGET_FILE = "target_encoder.pt"
DEEPSPEED_META_FILE = "scalejepa_deepspeed.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step of a step directory's name, None for any other name."""
    match = STEP_DIR_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_committed(step_dir: str | Path) -> bool:
    return (Path(step_dir) / COMMIT_MARKER).is_file()


def committed_step_dirs(checkpoints: str | Path) -> list[Path]:
    """Committed step directories, oldest first."""
    folder = Path(checkpoints)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if step_of(p) is not None and is_committed(p)]
    return sorted(found, key=step_of)


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def export(self) -> Path:
        return self.root / EXPORT_DIR / EXPORT_FILE

    @property
    def profile(self) -> Path:
        return self.root / PROFILE_DIR

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def preempted(self) -> Path:
        return self.root / PREEMPTED_MARKER

    @property
    def init_from(self) -> Path:
        return self.root / INIT_FROM_FILE

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    def looks_like_run(self) -> bool:
        return self.checkpoints.is_dir() or self.config.is_file()


# The sweep directory (scalejepa-sweep).
PLAN_FILE = "plan.json"
SWEEP_RUNS_DIR = "runs"
SWEEP_RESULT_FILE = "sweep_result.json"
SWEEP_LOG_FILE = "sweep.log"
ROWS_FILE = "runs.jsonl"
FIT_FILE = "fit.json"
FORECAST_FILE = "forecast.json"
REPORT_DIR = "report"
LOGS_DIR = "logs"
SLURM_SCRIPT = "slurm/sweep.sbatch"


@dataclass(frozen=True)
class SweepDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def plan(self) -> Path:
        return self.root / PLAN_FILE

    @property
    def rows(self) -> Path:
        return self.root / ROWS_FILE

    @property
    def fit(self) -> Path:
        return self.root / FIT_FILE

    @property
    def forecast(self) -> Path:
        return self.root / FORECAST_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def slurm_script(self) -> Path:
        return self.root / SLURM_SCRIPT

    def job_log(self, job: int) -> Path:
        return self.logs / f"job_{job:04d}.log"

    @property
    def slurm_log_pattern(self) -> Path:
        """sbatch's --output: %A the array's job id, %a the task's index."""
        return self.logs / "slurm-%A_%a.out"

    def run(self, name: str) -> RunDir:
        return RunDir(self.root / SWEEP_RUNS_DIR / name)

    def result(self, name: str) -> Path:
        return self.run(name).root / SWEEP_RESULT_FILE

    def run_log(self, name: str) -> Path:
        return self.run(name).root / SWEEP_LOG_FILE

    def probe_result(self, name: str, protocol: str) -> Path:
        return self.run(name).root / f"probe_{protocol}.json"

    def is_finished(self, name: str) -> bool:
        return self.result(name).is_file()
