"""The per-step accounting of training logs (scalejepa.metrics)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scalejepa.config import load_config
from scalejepa.layout import RunDir
from scalejepa.metrics import MetricsProcessor, format_seconds, perf_scalars
from scalejepa.step import StepSchedule


def test_perf_scalars_for_training_logs():
    config = load_config("vit_h14_in1k_ep300")
    m = perf_scalars(config, images_per_sec_per_gpu=600.0, context_tokens=68.5, target_tokens=44.0, peak=989.0)
    assert m["perf/tflops_per_gpu"] == pytest.approx(656e9 * 600 / 1e12, rel=2e-3)
    assert m["perf/mfu_pct"] == pytest.approx(39.8, abs=0.2)  # 600 img/s of ViT-H/14 ~ 40% of an H100
    assert m["perf/gpu_hours_per_epoch"] == pytest.approx(1_281_167 / 600 / 3600)
    # 300 epochs at that rate: ~178 GPU-hours
    assert 300 * m["perf/gpu_hours_per_epoch"] == pytest.approx(178, abs=2)
    cpu = perf_scalars(config, images_per_sec_per_gpu=1.0, context_tokens=68.5, target_tokens=44.0,
                       peak=None, images_per_epoch=0)
    assert set(cpu) == {"perf/tflops_per_gpu"}
    assert np.isfinite(cpu["perf/tflops_per_gpu"])


def _step(loss: float, images: int, context: int, target: int):
    masks = SimpleNamespace(batch_size=images, context_tokens=context, target_tokens=target)
    return SimpleNamespace(loss=torch.tensor(loss), data_wait_s=0.0, batches=[SimpleNamespace(masks=masks)])


def test_processor_averages_a_window_and_writes_jsonl_and_tensorboard(tmp_path):
    config = load_config("debug_cpu", ["mask.num_targets=4"])
    run = RunDir(tmp_path)
    metrics = MetricsProcessor(config, run, device=torch.device("cpu"), world_size=2, is_main=True,
                               images_per_epoch=1000)
    metrics.record_step(_step(2.0, images=8, context=80, target=320))
    metrics.record_step(_step(1.0, images=8, context=160, target=320))
    record = metrics.scalars(2, StepSchedule(1e-3, 0.04, 0.996))
    assert record["train/loss"] == pytest.approx(1.5)
    assert record["train/context_tokens"] == pytest.approx(15.0)
    assert record["train/target_tokens"] == pytest.approx(40.0)
    assert record["perf/imgs_per_sec"] > 0 and "perf/gpu_hours_per_epoch" in record
    assert "perf/max_memory_gib" not in record  # CPU: no GPU memory to report
    metrics.write(2, record, {"epoch": 0.5})
    # A new window starts after every log step.
    metrics.record_step(_step(4.0, images=8, context=80, target=320))
    assert metrics.scalars(3, StepSchedule(1e-3, 0.04, 0.996))["train/loss"] == pytest.approx(4.0)
    metrics.close()
    line = json.loads(run.metrics.read_text().splitlines()[0])
    assert line["step"] == 2 and line["loss"] == pytest.approx(1.5) and line["epoch"] == 0.5
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard.iterdir())


def test_only_the_main_rank_writes(tmp_path):
    metrics = MetricsProcessor(load_config("debug_cpu"), RunDir(tmp_path), device=torch.device("cpu"),
                               world_size=2, is_main=False, images_per_epoch=0)
    metrics.record_step(_step(1.0, images=2, context=10, target=20))
    metrics.write(1, metrics.scalars(1, StepSchedule(1e-3, 0.04, 0.996)))
    metrics.close()
    assert list(tmp_path.iterdir()) == []


def test_format_seconds():
    assert format_seconds(3725.9) == "1:02:05" and format_seconds(-3) == "0:00:00"
