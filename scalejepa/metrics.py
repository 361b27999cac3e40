"""Run metrics: the per-step accounting between two log steps, and where it goes.

:class:`MetricsProcessor` (torchtitan's ``MetricsProcessor`` pattern) accumulates what
every step did (images, context and target tokens, the loss as a device tensor, time
waiting for data), and on a log step turns it into scalars: training values, throughput,
model TFLOP/s and MFU (``scalejepa.flops``), GPU-hours per epoch, peak GPU memory, the
loader's error counts, the grad norm, the collapse monitors and the periodic kNN. They are
written as one JSON object per log step to ``RUN/metrics.jsonl`` and as TensorBoard
scalars to ``RUN/tb``, by rank 0 only; the log step is the only place that syncs the host.
"""

from __future__ import annotations

import json
import time

import torch

from torch.utils.tensorboard import SummaryWriter

from scalejepa import flops
from scalejepa.config import Config
from scalejepa.eval.monitors import collapse_metrics
from scalejepa.io import atomic_write_text
from scalejepa.layout import RunDir
from scalejepa.step import BatchCounts, StepResult, StepSchedule


def perf_scalars(config: Config, *, images_per_sec_per_gpu: float, context_tokens: float, target_tokens: float,
                 peak: float | None, images_per_epoch: int | None = None) -> dict[str, float]:
    """``perf/tflops_per_gpu``, ``perf/mfu_pct`` (left out when ``peak`` is None: CPU or an
    unknown GPU) and ``perf/gpu_hours_per_epoch`` (``images_per_epoch``: default
    ``config.data.num_samples``, left out if 0), from the analytic model FLOPs.

    ``images_per_sec_per_gpu``: images one rank trained per second; ``context_tokens`` per
    image / ``target_tokens`` per target block: as :func:`scalejepa.flops.step_flops_per_image`."""
    per_image = flops.step_flops_per_image(config, context_tokens, target_tokens)
    out = {"perf/tflops_per_gpu": per_image * images_per_sec_per_gpu / 1e12}
    mfu = flops.mfu_pct(per_image, images_per_sec_per_gpu, peak)
    if mfu is not None:
        out["perf/mfu_pct"] = mfu
    epoch = images_per_epoch if images_per_epoch is not None else config.data.num_samples
    if epoch and images_per_sec_per_gpu > 0:
        out["perf/gpu_hours_per_epoch"] = flops.gpu_hours(epoch, images_per_sec_per_gpu)
    return out


def memory_scalars(device: torch.device) -> dict[str, float]:
    """Peak GPU memory since the last call (allocated by tensors, reserved by the allocator)."""
    if device.type != "cuda":
        return {}
    out = {"perf/max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "perf/max_reserved_memory_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return out


class MetricsWriter:
    """One JSON line per log step in ``metrics.jsonl`` and the same scalars in TensorBoard."""

    def __init__(self, run: RunDir, resume_step: int | None = None):
        self.path = run.metrics
        if resume_step is not None:
            self._drop_after(resume_step)
        # purge_step hides the events a crashed run wrote past the checkpoint we resume from.
        self.tb = SummaryWriter(str(run.tensorboard), purge_step=resume_step)

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, scalars: dict[str, float], extra: dict | None = None) -> None:
        """``scalars`` go to TensorBoard under their names (``train/loss``) and to the
        JSON line under their last component (``loss``); ``extra`` only to the JSON line."""
        record = {"step": step}
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
            record[name.rsplit("/", 1)[-1]] = value
        record.update(extra or {})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.tb.close()


def collapse_scalars(targets: torch.Tensor | None) -> dict[str, float]:
    """``monitor/feature_std`` and ``monitor/rankme`` of target features (rows: target
    patches; ``scalejepa.eval.monitors``); none without at least two rows."""
    if targets is None or targets.shape[0] < 2:
        return {}
    return {f"monitor/{name}": value for name, value in collapse_metrics(targets).items()}


def knn_scalars(scores: dict[str, float]) -> dict[str, float]:
    """``eval/knn_top1``, ``eval/knn_top5`` and ``eval/position_share`` from the scores of a
    :class:`scalejepa.eval.knn.KnnEvaluator`."""
    return {f"eval/{name}": value for name, value in scores.items()}


class MetricsProcessor:
    """Accumulates the steps between two log steps (:meth:`record_step`);
    :meth:`log_and_reset` turns them into the log step's scalars, writes them and starts
    the next window.

    ``data``: the loader, whose ``corrupt_total`` and ``shard_errors_total`` are logged;
    ``steps_per_epoch``: for the ``epoch`` of every JSON line."""

    def __init__(self, config: Config, run: RunDir, *, device: torch.device, world_size: int, is_main: bool,
                 images_per_epoch: int, steps_per_epoch: int, data=None, resume_step: int | None = None):
        self.config = config
        self.device = device
        self.world_size = world_size
        self.images_per_epoch = images_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.data = data
        self.peak = flops.peak_tflops(device)
        self.writer = MetricsWriter(run, resume_step) if is_main else None
        self._start(resume_step or 0)

    def _start(self, step: int) -> None:
        self.window_start_step = step
        self.window_start_time = time.perf_counter()
        self.data_wait = 0.0
        self.counts = BatchCounts()
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_norm: torch.Tensor | None = None

    def record_step(self, result: StepResult) -> None:
        """One step's accounting; no host sync (the loss stays on the device)."""
        self.loss_sum += result.loss
        self.data_wait += result.data_wait_s
        self.counts += result.counts
        self.grad_norm = result.grad_norm  # the log step's own is the one logged

    def log_and_reset(self, step: int, schedule: StepSchedule, *, targets: torch.Tensor | None = None,
                      knn_scores: dict[str, float] | None = None) -> dict[str, float]:
        """Compute this window's scalars (the log step's host sync), with the loader's
        error counts, the last step's grad norm, the collapse monitors of ``targets`` (the
        last micro-batch's target features) and ``knn_scores``; write them (rank 0); start a
        new window. Returns the scalars."""
        steps = max(1, step - self.window_start_step)
        elapsed = time.perf_counter() - self.window_start_time
        counts = self.counts
        images = max(1, counts.images)
        rank_images_per_sec = counts.images / elapsed
        out = {
            "train/loss": float(self.loss_sum) / steps,
            "train/lr": schedule.lr,
            "train/wd": schedule.weight_decay,
            "train/ema_momentum": schedule.ema_momentum,
            "train/context_tokens": counts.context_tokens / images,
            "train/target_tokens": counts.target_tokens / images,
            "perf/imgs_per_sec": rank_images_per_sec * self.world_size,
            "perf/step_time_s": elapsed / steps,
            "perf/data_wait_pct": 100.0 * self.data_wait / elapsed,
        }
        out.update(perf_scalars(
            self.config, images_per_sec_per_gpu=rank_images_per_sec, context_tokens=counts.context_tokens / images,
            target_tokens=counts.target_tokens / (images * self.config.mask.num_targets), peak=self.peak,
            images_per_epoch=self.images_per_epoch,
        ))
        out.update(memory_scalars(self.device))
        if self.data is not None:
            out["data/corrupt_samples"] = self.data.corrupt_total
            out["data/shard_errors"] = self.data.shard_errors_total
        if self.grad_norm is not None:
            out["train/grad_norm"] = float(self.grad_norm)
        out.update(collapse_scalars(targets))
        out.update(knn_scalars(knn_scores or {}))
        self.write(step, out)
        self._start(step)
        return out

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """``scalars`` as the line of ``step`` (rank 0 only), with its epoch."""
        if self.writer is not None:
            self.writer.write(step, scalars, {"epoch": step / self.steps_per_epoch})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_line(step: int, total: int, record: dict, eta_s: float) -> str:
    return (
        f"step {step}/{total} ({100 * step / total:.1f}%) | loss {record['train/loss']:.4f} | "
        f"lr {record['train/lr']:.2e} | {record['perf/imgs_per_sec']:.1f} img/s | "
        f"data {record['perf/data_wait_pct']:.0f}% | ETA {format_seconds(eta_s)}"
    )


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

