"""Fault injection: the faults of shared clusters, each injected for real, with nothing lost.

Runs are the 6-step synthetic runs of ``_distributed`` (checkpoints at steps 3 and 6),
under torchrun where processes matter; faults come from ``tests/_inject_fault.py`` (a
wrapper of the trainer, no hooks in the production code). Later losses are compared with
the uninterrupted one-process run: bit-identical on one rank, to reduction-order noise on
two. Every test reuses the session's reference run; the ones on one run directory share it.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _distributed import COMMON, REPO, STEPS, assert_losses_match, checkpoint, losses, reference, subprocess_env, \
    torchrun, train_here

from scalejepa.checkpoint import Checkpointer, read_commit
from scalejepa.preempt import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.faults

INJECT = str(REPO / "tests" / "_inject_fault.py")


def faults_env(fault_dir: Path, faults: str, **settings) -> dict:
    fault_dir.mkdir(parents=True, exist_ok=True)
    return {"SCALEJEPA_FAULTS": faults, "SCALEJEPA_FAULT_DIR": str(fault_dir),
            **{f"SCALEJEPA_FAULT_{k.upper()}": str(v) for k, v in settings.items()}}


def marker(run_dir: Path) -> dict:
    return json.loads((run_dir / "PREEMPTED").read_text())


def assert_bit_identical(run_dir: Path, ref_dir: Path, steps) -> None:
    got, want = losses(run_dir), losses(ref_dir)
    assert [got[s] for s in steps] == [want[s] for s in steps], (got, want)


# ----------------------------------------------------------------------------- preemption


def test_sigterm_to_torchrun_one_rank_checkpoints_and_resumes_bit_identically(tmp_path_factory, caplog):
    """SIGTERM to torchrun (as SLURM sends it), forwarded to the worker; a second SIGTERM
    arrives during the preemption's save and changes nothing."""
    ref = reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("sigterm") / "run"
    env = faults_env(run_dir.parent / "faults", "signal,signal_in_save", microstep=2, signal="TERM", target="parent")
    proc = torchrun(run_dir, 1, script=INJECT, extra_env=env, check=False)
    assert proc.returncode != 0  # torchrun reports its own signal, hence the marker
    assert "SIGTERM received: stopping after this step with a checkpoint" in proc.stderr
    assert "a second SIGTERM during the save" in proc.stderr
    record = marker(run_dir)
    assert record["signal"] == "SIGTERM" and 1 <= record["step"] < STEPS
    stopped = checkpoint(run_dir, record["step"])
    assert read_commit(stopped)["step"] == record["step"] and max(losses(run_dir)) == record["step"]
    assert not (run_dir / "run.lock").exists()  # released on the way out
    # The requeued job: --resume auto, the same losses as the run that was never stopped.
    caplog.set_level(logging.INFO, logger="scalejepa.train")
    assert train_here(run_dir) == 0
    assert f"resumed from {stopped}" in caplog.text
    assert_bit_identical(run_dir, ref, range(1, STEPS + 1))
    assert not (run_dir / "PREEMPTED").exists()


def test_sigusr1_to_one_of_two_ranks_stops_both_at_the_same_step(tmp_path_factory, capfd):
    """Rank 1 alone gets SIGUSR1: the flag travels with the loss all-reduce, both ranks stop
    after the same step with one checkpoint. torchrun's restart finds the marker and does
    not train on. While the run is alive, a second run on its directory is refused."""
    ref = reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("sigusr1") / "run"
    fault_dir = run_dir.parent / "faults"
    env = faults_env(fault_dir, "hold,signal", microstep=6, signal="USR1", rank=1)
    cmd_env = {**subprocess_env(), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           INJECT, "--config", "debug_cpu", "--run-dir", str(run_dir), "--resume", "auto", *COMMON,
           "distributed.backend=fsdp2"]
    log = fault_dir / "torchrun.log"  # a file, not a pipe nobody reads while the run is held
    with open(log, "w") as out, subprocess.Popen(cmd, env=cmd_env, cwd=REPO, stdout=out, stderr=out) as first:
        deadline = time.monotonic() + 300
        while not (fault_dir / "ready").exists():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        # Two runs on one run directory: the second refuses, naming the first.
        assert train_here(run_dir) == 1
        err = capfd.readouterr().err
        assert f"run directory {run_dir} is in use by another run (pid" in err and "--run-dir" in err
        (fault_dir / "go").touch()
        first.wait(timeout=300)
    stderr = log.read_text()
    assert first.returncode != 0
    assert "SIGUSR1 received" in stderr and stderr.count("not restarting inside this allocation") == 2, stderr[-4000:]
    record = marker(run_dir)
    assert record["step"] == 4 and record["signal"] == "peer"  # rank 0 stopped on rank 1's signal
    assert read_commit(checkpoint(run_dir, 4))["world_size"] == 2
    torchrun(run_dir, 2, "distributed.backend=fsdp2")
    assert_losses_match(run_dir, ref)
    assert not (run_dir / "PREEMPTED").exists() and not (run_dir / "run.lock").exists()


# ----------------------------------------------------------------------------- abrupt kills


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_a_save_resumes_from_the_previous_commit(tmp_path_factory, mode):
    ref = reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp(f"kill_{mode}") / "run"
    env = faults_env(run_dir.parent / "faults", "kill_in_save", step=STEPS)
    proc = torchrun(run_dir, 1, f"checkpoint.async_save={str(mode == 'async').lower()}", script=INJECT,
                    max_restarts=1, extra_env=env)  # the restart is the plain trainer
    assert "SIGKILL" in proc.stderr
    # The killed save left step 6 uncommitted: the restart ignored it, resumed from step 3,
    # took over the dead run's lock, and wrote step 6 again.
    assert f"resumed from {checkpoint(run_dir, 3)} at step 3" in proc.stderr
    assert "stale lock" in proc.stderr
    assert read_commit(checkpoint(run_dir, STEPS))["step"] == STEPS
    assert_bit_identical(run_dir, ref, range(1, STEPS + 1))


# ----------------------------------------------------------------------------- damaged checkpoints


def test_a_damaged_committed_checkpoint_is_an_error_naming_the_file(tmp_path_factory, capfd):
    """--resume auto does not fall back to step 3 by itself (see Checkpointer.verify): it
    names the file and the older checkpoint to resume from explicitly."""
    ref = reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(ref, run_dir)
    step6, step3 = checkpoint(run_dir, STEPS), checkpoint(run_dir, 3)
    shard = next(step6.glob("*.distcp"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    for resume in ("auto", str(step6)):
        assert train_here(run_dir, "train.steps=8", resume=resume) == 1
        err = capfd.readouterr().err
        assert f"shard file {shard} is truncated ({size // 2} bytes, its .metadata needs {size})" in err
        assert f"--resume {step3}" in err
    shard.unlink()
    assert train_here(run_dir, "train.steps=8") == 1
    assert f"shard file {shard} is missing" in capfd.readouterr().err
    assert not (run_dir / "run.lock").exists()


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_saving_names_the_path_and_keeps_earlier_checkpoints(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("disk_full") / "run"
    env = faults_env(run_dir.parent / "faults", "disk_full", fsize=4 * 2**20)
    proc = torchrun(run_dir, 1, script=INJECT, extra_env=env, check=False)
    assert proc.returncode != 0
    step6 = checkpoint(run_dir, STEPS)
    assert f"no space to save checkpoint {step6}: File too large" in proc.stderr, proc.stderr[-3000:]
    assert "bytes), " in proc.stderr and "MiB are free there" in proc.stderr and "earlier checkpoints" in proc.stderr
    assert not step6.exists()
    Checkpointer.verify(Checkpointer.check_committed(checkpoint(run_dir, 3)))  # intact


# ----------------------------------------------------------------------------- a NaN on one rank


def test_nan_on_one_rank_stops_every_rank_before_the_optimizer_step(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nan") / "run"
    fault_dir = run_dir.parent / "faults"
    env = faults_env(fault_dir, "nan", step=4, rank=1)
    proc = torchrun(run_dir, 2, "distributed.backend=fsdp2", script=INJECT, extra_env=env, check=False)
    assert proc.returncode != 0
    message = "loss is nan at step 4"
    assert proc.stderr.count(message) == 2, proc.stderr[-4000:]  # the same message on both ranks
    assert [int((fault_dir / f"rank{r}.optimizer_steps").read_text()) for r in (0, 1)] == [4, 4]
    assert max(losses(run_dir)) == 4 and Checkpointer(run_dir / "checkpoints").latest() == checkpoint(run_dir, 3)


# ----------------------------------------------------------------------------- durability


def test_markers_and_exports_are_fsynced_before_they_count(tmp_path, monkeypatch):
    """Every file of a step directory, the step directory and its parent are fsynced
    before the marker's rename; the marker and the export are fsynced with their folders."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_dir = tmp_path / "run"
    assert train_here(run_dir, "train.steps=1", "checkpoint.interval=0") == 0
    step_dir = checkpoint(run_dir, 1)
    commit = events.index(("replace", str(step_dir / "COMMITTED")))
    before = {path for kind, path in events[:commit] if kind == "fsync"}
    synced = {Path(p).name for p in before if Path(p).parent == step_dir}
    for name in sorted(os.listdir(step_dir)):  # fsynced under their own or their temporary name
        if name != "COMMITTED":
            assert name in synced or any(n.startswith((f"{name}.tmp", f".{name}.tmp")) for n in synced), (name, synced)
    assert {str(step_dir), str(step_dir.parent)} <= before
    assert ("fsync", str(step_dir)) in events[commit:]  # the marker's own directory entry
    export = run_dir / "export" / "target_encoder.pt"
    done = events.index(("replace", str(export)))
    assert events[done + 1] == ("fsync", str(export.parent))
    assert any(kind == "fsync" and path.startswith(str(export.parent / ".target_encoder.pt.tmp"))
               for kind, path in events[:done])


def test_preempt_signals_are_checked_before_any_work(tmp_path, capsys):
    assert train_here(tmp_path / "run", "train.preempt_signals=SIGTERM,SIGKILL") == 2
    assert "train.preempt_signals: 'SIGKILL' is not a signal a process can handle" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
