"""The per-step accounting of training logs (scalejepa.metrics)."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scalejepa.config import load_config
from scalejepa.layout import RunDir
from scalejepa.metrics import MetricsProcessor, format_seconds, perf_scalars
from scalejepa.step import BatchCounts, StepSchedule


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


def _step(loss: float, images: int, context: int, target: int, grad_norm: float | None = None):
    return SimpleNamespace(loss=torch.tensor(loss), data_wait_s=0.0, counts=BatchCounts(images, context, target),
                           grad_norm=None if grad_norm is None else torch.tensor(grad_norm))


def test_processor_averages_a_window_and_writes_jsonl_and_tensorboard(tmp_path):
    config = load_config("debug_cpu", ["mask.num_targets=4"])
    run = RunDir(tmp_path)
    loader = SimpleNamespace(corrupt_total=3, shard_errors_total=1)
    metrics = MetricsProcessor(config, run, device=torch.device("cpu"), world_size=2, is_main=True,
                               images_per_epoch=1000, steps_per_epoch=4, data=loader)
    metrics.record_step(_step(2.0, images=8, context=80, target=320, grad_norm=9.0))
    metrics.record_step(_step(1.0, images=8, context=160, target=320, grad_norm=0.5))
    targets = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    scores = {"knn_top1": 40.0, "knn_top5": 80.0, "position_share": 0.2}
    record = metrics.log_and_reset(2, StepSchedule(1e-3, 0.04, 0.996), targets=targets, knn_scores=scores)
    assert record["train/loss"] == pytest.approx(1.5)
    assert record["train/context_tokens"] == pytest.approx(15.0)
    assert record["train/target_tokens"] == pytest.approx(40.0)
    assert record["perf/imgs_per_sec"] > 0 and "perf/gpu_hours_per_epoch" in record
    assert "perf/max_memory_gib" not in record  # CPU: no GPU memory to report
    # The log step's other families: the loader's error counts, the last step's grad norm,
    # the collapse monitors of the targets and the kNN scores.
    assert (record["data/corrupt_samples"], record["data/shard_errors"]) == (3, 1)
    assert record["train/grad_norm"] == pytest.approx(0.5)
    assert record["monitor/rankme"] > 1 and record["monitor/feature_std"] > 0
    assert (record["eval/knn_top1"], record["eval/knn_top5"], record["eval/position_share"]) == (40.0, 80.0, 0.2)
    # A new window starts after every log step.
    metrics.record_step(_step(4.0, images=8, context=80, target=320))
    again = metrics.log_and_reset(3, StepSchedule(1e-3, 0.04, 0.996))
    assert again["train/loss"] == pytest.approx(4.0)
    assert "train/grad_norm" not in again and not any(k.startswith(("monitor/", "eval/")) for k in again)
    metrics.close()
    lines = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    line = lines[0]
    assert line["step"] == 2 and line["loss"] == pytest.approx(1.5) and line["epoch"] == 0.5
    assert line["knn_top1"] == 40.0 and line["corrupt_samples"] == 3
    assert [r["step"] for r in lines] == [2, 3] and lines[1]["epoch"] == 0.75
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard.iterdir())


def test_only_the_main_rank_writes(tmp_path):
    metrics = MetricsProcessor(load_config("debug_cpu"), RunDir(tmp_path), device=torch.device("cpu"),
                               world_size=2, is_main=False, images_per_epoch=0, steps_per_epoch=1)
    metrics.record_step(_step(1.0, images=2, context=10, target=20))
    metrics.log_and_reset(1, StepSchedule(1e-3, 0.04, 0.996))
    metrics.close()
    assert list(tmp_path.iterdir()) == []


def test_format_seconds():
    assert format_seconds(3725.9) == "1:02:05" and format_seconds(-3) == "0:00:00"


def test_a_step_returns_the_counts_of_its_micro_batches_not_the_batches():
    from scalejepa.data.pipeline import SyntheticLoader
    from scalejepa.dist_env import DistEnv
    from scalejepa.masks import MaskGenerator
    from scalejepa.parallel import build_engine
    from scalejepa.step import StepResult, train_step

    config = load_config("debug_cpu", ["model.pred_depth=1", "mask.context=pack"])
    engine = build_engine(config, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    loader = SyntheticLoader(batch_size=3, image_size=32, mask_generator=MaskGenerator(8, config.mask), seed=0)
    seen = []

    def next_batch():
        seen.append(next(loader))
        return seen[-1]

    result = train_step(engine, next_batch, StepSchedule(1e-3, 0.04, 0.996), step=0, grad_accum=2)
    assert len(seen) == 2 and "batches" not in {f.name for f in dataclasses.fields(StepResult)}
    assert result.counts == BatchCounts(6, sum(b.masks.context_tokens for b in seen),
                                        sum(b.masks.target_tokens for b in seen))
