"""End-to-end training on the embedded MNIST digits: loss, resume, errors, outputs."""

import json
import subprocess
import sys

import torch

from scalejepa.train import main

# A small, fast variant of debug_cpu: ~2-4 s of training per 10 steps on 2 cores.
TINY = ["train.batch_size=16", "train.log_every=1", "model.pred_depth=2", "data.num_workers=2",
        "data.shuffle_buffer=64", "train.steps=20"]


def run(run_dir, *overrides, resume="auto"):
    return main(["--config", "debug_cpu", "--run-dir", str(run_dir), "--resume", resume, *TINY, *overrides])


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_debug_run_writes_everything_and_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, "train.steps=40", "checkpoint.interval=20") == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("loss", "lr", "wd", "ema_momentum", "imgs_per_sec", "step_time_s", "data_wait_pct",
                "context_tokens", "target_tokens", "tflops_per_gpu", "gpu_hours_per_epoch", "feature_std", "rankme"):
        assert key in records[0], key
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]
    exported = torch.load(run_dir / "export" / "target_encoder.pt")
    assert "patch_embed.proj.weight" in exported and not any(k.startswith(("module.", "_orig_mod")) for k in exported)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/wd", "train/ema_momentum", "train/context_tokens",
                "train/target_tokens", "perf/imgs_per_sec", "perf/step_time_s", "perf/data_wait_pct",
                "perf/tflops_per_gpu", "perf/gpu_hours_per_epoch", "monitor/feature_std", "monitor/rankme"):
        assert tag in tags, tag
    assert len(events.Scalars("train/loss")) == 40


def test_periodic_knn_is_logged_from_step_0(tmp_path):
    """kNN and the position share at step 0 (the random init) and every knn_every steps,
    in the JSON lines and in TensorBoard: a run that does not learn shows a flat line."""
    run_dir = tmp_path / "run"
    assert run(run_dir, "train.steps=4", "eval.knn_every=2") == 0
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "knn_top1" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert 0 <= r["knn_top1"] <= 100 and r["knn_top5"] >= r["knn_top1"] and 0 < r["position_share"] < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    for tag in ("eval/knn_top1", "eval/position_share"):
        assert [e.step for e in events.Scalars(tag)] == [0, 2, 4], tag


def test_periodic_knn_needs_labeled_shards(tmp_path, capsys):
    assert run(tmp_path / "run", "eval.knn_every=2", "eval.knn_val_shards=") == 2
    assert "eval.knn_val_shards" in capsys.readouterr().err


def test_resume_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, "mask.context=pack") == 0
    assert run(resumed, "mask.context=pack", "train.stop_at_step=10") == 0
    assert max(losses(resumed)) == 10
    assert run(resumed, "mask.context=pack") == 0
    a, b = losses(straight), losses(resumed)
    assert list(b) == list(range(1, 21))
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # bit-identical on CPU
    wa = torch.load(straight / "export" / "target_encoder.pt")
    wb = torch.load(resumed / "export" / "target_encoder.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(run_dir, "train.steps=2") == 0
    assert run(run_dir, "train.steps=2", resume="never") == 1
    assert "--resume auto" in capsys.readouterr().err
    assert run(tmp_path / "other", resume=str(tmp_path / "missing" / "step_00000002")) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    # A checkpoint whose save never committed is refused, not silently skipped.
    ckpt = run_dir / "checkpoints" / "step_00000002"
    (ckpt / "COMMITTED").unlink()
    assert run(tmp_path / "third", resume=str(ckpt)) == 1
    assert "did not finish" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(run_dir, "train.steps=2") == 0
    ckpt = run_dir / "checkpoints" / "step_00000002"
    for shard in ckpt.glob("*.distcp"):
        shard.write_bytes(b"garbage")
    assert run(run_dir, "train.steps=4") == 1
    assert "could not load checkpoint" in capsys.readouterr().err


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch, capsys):
    from scalejepa.data import pipeline

    original = pipeline.TrainLoader.__next__
    calls = {"n": 0}

    def poisoned(self):
        batch = original(self)
        calls["n"] += 1
        if calls["n"] == 4:
            batch.images = batch.images * float("nan")
        return batch

    monkeypatch.setattr(pipeline.TrainLoader, "__next__", poisoned)
    run_dir = tmp_path / "run"
    assert run(run_dir, "checkpoint.interval=2", "data.num_workers=0") == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "before the optimizer step" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]


def test_batch_not_divisible_is_a_clear_error(tmp_path, capsys):
    assert run(tmp_path / "run", "train.batch_size=10", "train.grad_accum=4") == 2
    assert "train.batch_size=10 is not divisible by train.grad_accum=4" in capsys.readouterr().err


def test_grad_accumulation_runs(tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, "train.grad_accum=2", "train.steps=3") == 0
    assert len(losses(run_dir)) == 3


def test_console_script_and_module_entry_points(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scalejepa.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "debug_cpu" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "scalejepa.train", "--config", "debug_cpu", "--run-dir", str(tmp_path / "r"),
         *TINY, "train.steps=3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trained 3 steps" in proc.stdout and "tensorboard --logdir" in proc.stdout


def test_profiler_writes_a_trace_per_rank_with_the_step_phases(tmp_path):
    from scalejepa.step import PHASE_OPTIMIZER, PHASES

    run_dir = tmp_path / "run"
    assert run(run_dir, "train.steps=4", "data.num_workers=0", "profile.enabled=true", "profile.start=1",
               "profile.steps=2") == 0
    traces = list((run_dir / "profile").glob("rank0.*.pt.trace.json"))  # the name TensorBoard's plugin reads
    assert len(traces) == 1, list((run_dir / "profile").iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]  # Chrome trace format (Perfetto opens it)
    names = [e.get("name", "") for e in events]
    for phase in PHASES:
        assert phase in names, phase
    assert names.count(PHASE_OPTIMIZER) == 2  # the two profiled steps, no others
    assert {"ProfilerStep#1", "ProfilerStep#2"} <= set(names)
