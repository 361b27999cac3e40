"""The launch scripts run for real on CPU (2 processes, a few steps): single node, multi-node
(c10d rendezvous, here with one node) and SLURM (``srun``, ``scontrol`` and ``scancel``
replaced by shims that act on this machine). Each prints the command it runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from _distributed import REPO, losses, subprocess_env

TRAIN_ARGS = ["--config", "debug_cpu", "data.synthetic=true", "data.num_samples=64", "train.batch_size=8",
              "train.steps=2", "train.log_every=1", "model.pred_depth=2", "checkpoint.interval=0",
              "distributed.backend=fsdp2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    full_env = {**subprocess_env(), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          timeout=300, env=full_env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_single_node(tmp_path):
    proc = launch("single_node.sh", "--run-dir", str(tmp_path / "run"), *TRAIN_ARGS, env={"NPROC_PER_NODE": "2"})
    assert "+ " in proc.stdout and "--standalone --nproc-per-node=2" in proc.stdout
    assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_multi_node_with_c10d_rendezvous(tmp_path):
    env = {"NNODES": "1", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"localhost:{free_port()}", "RDZV_ID": "test"}
    proc = launch("multi_node.sh", "--run-dir", str(tmp_path / "run"), *TRAIN_ARGS, env=env)
    assert "--rdzv-backend=c10d" in proc.stdout and "--resume auto" in proc.stdout
    assert sorted(losses(tmp_path / "run")) == [1, 2]


@pytest.fixture
def slurm_shims(tmp_path):
    """srun runs its command here (and records its pid), scancel --signal=SIG signals it,
    scontrol answers the head node's name and logs requeues to bin/requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f'#!/usr/bin/env bash\necho $$ > {bin_dir}/srun.pid\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [[ "$1" == requeue ]]; then echo "$2" >> {bin_dir}/requeued; else echo localhost; fi\n')
    (bin_dir / "scancel").write_text(
        f'#!/usr/bin/env bash\nkill -s "${{1#--signal=}}" "$(cat {bin_dir}/srun.pid)"\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    return bin_dir


def slurm_env(run_dir, slurm_shims, gpus: int = 2) -> dict:
    return {"PATH": f"{slurm_shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test", "GPUS_PER_NODE": str(gpus),
            "RDZV_PORT": str(free_port()), "RUN_DIR": str(run_dir)}


def test_slurm_batch_script(tmp_path, slurm_shims):
    run_dir = tmp_path / "run"
    env = slurm_env(run_dir, slurm_shims)
    proc = launch("slurm.sbatch", *TRAIN_ARGS, "train.stop_at_step=1", env=env)  # preempted after step 1
    assert "srun --kill-on-bad-exit=1" in proc.stdout and "--rdzv-id=4242" in proc.stdout
    assert "--resume auto" in proc.stdout
    assert sorted(losses(run_dir)) == [1]
    # The requeued job (same id, same run directory) continues from its last checkpoint.
    proc = launch("slurm.sbatch", *TRAIN_ARGS, env=env)
    assert "resumed from" in proc.stderr and "step_00000001 at step 1" in proc.stderr
    assert sorted(losses(run_dir)) == [1, 2]


@pytest.mark.parametrize("torchrun", ["installed", "without --shutdown-timeout"])
def test_slurm_passes_shutdown_timeout_only_to_a_torchrun_that_has_it(tmp_path, slurm_shims, torchrun):
    """torch 2.11's torchrun has no --shutdown-timeout: the script omits it there and says so.
    "without": a PYTHON that hides the flag from torchrun's --help, as an older torch's does."""
    from torch.distributed.run import get_args_parser

    python = sys.executable
    has_flag = "--shutdown-timeout" in get_args_parser().format_help()
    if torchrun != "installed":
        python, has_flag = tmp_path / "python", False
        python.write_text(f'#!/usr/bin/env bash\n"{sys.executable}" "$@" | sed s/--shutdown-timeout/--gone/\n')
        python.chmod(0o755)
    env = {**slurm_env(tmp_path / "run", slurm_shims), "DRY_RUN": "1", "SHUTDOWN_TIMEOUT": "123", "PYTHON": str(python)}
    proc = launch("slurm.sbatch", *TRAIN_ARGS, env=env)
    assert ("--shutdown-timeout=123" in proc.stdout) == has_flag, proc.stdout
    assert ("has no --shutdown-timeout" in proc.stderr) == (not has_flag), proc.stderr
    assert "--signals-to-handle=" in proc.stdout and not (tmp_path / "run").exists()


def test_slurm_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, slurm_shims):
    """USR1 to the batch script (sbatch --signal=B:USR1@...): it forwards TERM to the step
    (scancel), torchrun forwards it to the trainer, which commits a checkpoint and writes
    RUN/PREEMPTED; the script requeues the job. The requeued job continues from there."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    env = {**subprocess_env(), "PYTHON": sys.executable, **slurm_env(run_dir, slurm_shims, gpus=1)}
    args = [*TRAIN_ARGS, "distributed.backend=none", "train.steps=40"]
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *args], env=env, cwd=REPO,
                               stdout=out, stderr=out)
        deadline = time.monotonic() + 200
        while not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 2:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=200) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "USR1 received" in text and "requeueing job 4242" in text, text[-4000:]
    assert (slurm_shims / "requeued").read_text().split() == ["4242"]
    step = json.loads((run_dir / "PREEMPTED").read_text())["step"]
    assert 2 <= step < 40 and sorted(losses(run_dir)) == list(range(1, step + 1))
    proc = launch("slurm.sbatch", *args, env=slurm_env(run_dir, slurm_shims, gpus=1))  # the requeued job
    assert f"step_{step:08d} at step {step}" in proc.stderr
    assert sorted(losses(run_dir)) == list(range(1, 41)) and not (run_dir / "PREEMPTED").exists()
    assert (slurm_shims / "requeued").read_text().split() == ["4242"]  # not again: it finished
