"""Run metrics: the per-step accounting between two log steps, and where it goes.

:class:`MetricsProcessor` (torchtitan's ``MetricsProcessor`` pattern) accumulates what
every step did (images, context and target tokens, the loss as a device tensor, time
waiting for data), and on a log step turns it into scalars: training values, throughput,
model TFLOP/s and MFU (``scalejepa.flops``), GPU-hours per epoch, peak GPU memory. They are
written as one JSON object per log step to ``RUN/metrics.jsonl`` and as TensorBoard
scalars to ``RUN/tb``, by rank 0 only; the log step is the only place that syncs the host.
"""

from __future__ import annotations

import json
import time

import torch

from scalejepa import flops
from scalejepa.config import Config
from scalejepa.io import atomic_write_text
from scalejepa.layout import RunDir


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
        from torch.utils.tensorboard import SummaryWriter

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


class MetricsProcessor:
    """Accumulates steps between log steps; :meth:`log` turns them into scalars."""

    def __init__(self, config: Config, run: RunDir, *, device: torch.device, world_size: int, is_main: bool,
                 images_per_epoch: int, resume_step: int | None = None):
        self.config = config
        self.device = device
        self.world_size = world_size
        self.images_per_epoch = images_per_epoch
        self.peak = flops.peak_tflops(device)
        self.writer = MetricsWriter(run, resume_step) if is_main else None
        self._start(resume_step or 0)

    def _start(self, step: int) -> None:
        self.window_start_step = step
        self.window_start_time = time.perf_counter()
        self.data_wait = 0.0
        self.images = self.context_tokens = self.target_tokens = 0
        self.loss_sum = torch.zeros((), device=self.device)

    def record_step(self, result) -> None:
        """A :class:`scalejepa.step.StepResult`: no host sync (the loss stays on the device)."""
        self.loss_sum += result.loss
        self.data_wait += result.data_wait_s
        for batch in result.batches:
            self.images += batch.masks.batch_size
            self.context_tokens += batch.masks.context_tokens
            self.target_tokens += batch.masks.target_tokens

    def scalars(self, step: int, schedule) -> dict[str, float]:
        """This window's scalars (the log step's host sync), and a new window."""
        steps = max(1, step - self.window_start_step)
        elapsed = time.perf_counter() - self.window_start_time
        images = max(1, self.images)
        rank_images_per_sec = self.images / elapsed
        out = {
            "train/loss": float(self.loss_sum) / steps,
            "train/lr": schedule.lr,
            "train/wd": schedule.weight_decay,
            "train/ema_momentum": schedule.ema_momentum,
            "train/context_tokens": self.context_tokens / images,
            "train/target_tokens": self.target_tokens / images,
            "perf/imgs_per_sec": rank_images_per_sec * self.world_size,
            "perf/step_time_s": elapsed / steps,
            "perf/data_wait_pct": 100.0 * self.data_wait / elapsed,
        }
        out.update(perf_scalars(
            self.config, images_per_sec_per_gpu=rank_images_per_sec, context_tokens=self.context_tokens / images,
            target_tokens=self.target_tokens / (images * self.config.mask.num_targets), peak=self.peak,
            images_per_epoch=self.images_per_epoch,
        ))
        out.update(memory_scalars(self.device))
        self._start(step)
        return out

    def write(self, step: int, scalars: dict[str, float], extra: dict | None = None) -> None:
        if self.writer is not None:
            self.writer.write(step, scalars, extra)

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

