"""The launch scripts run for real on CPU (2 processes, a few steps): single node, multi-node
(c10d rendezvous, here with one node) and SLURM (``srun`` and ``scontrol`` replaced by
shims that run their command on this machine). Each prints the command it runs."""

import os
import socket
import subprocess
import sys

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
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho localhost\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    return bin_dir


def test_slurm_batch_script(tmp_path, slurm_shims):
    run_dir = tmp_path / "run"
    env = {"PATH": f"{slurm_shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test", "GPUS_PER_NODE": "2", "RDZV_PORT": str(free_port()),
           "RUN_DIR": str(run_dir)}
    proc = launch("slurm.sbatch", *TRAIN_ARGS, "train.stop_at_step=1", env=env)  # preempted after step 1
    assert "srun --kill-on-bad-exit=1" in proc.stdout and "--rdzv-id=4242" in proc.stdout
    assert "--resume auto" in proc.stdout
    assert sorted(losses(run_dir)) == [1]
    # The requeued job (same id, same run directory) continues from its last checkpoint.
    proc = launch("slurm.sbatch", *TRAIN_ARGS, env=env)
    assert "resumed from" in proc.stderr and "step_00000001 at step 1" in proc.stderr
    assert sorted(losses(run_dir)) == [1, 2]
