"""A micro sweep for real: plan, run (training and probe subprocesses), a re-run that
skips finished runs, collect; WSD branches as exact continuations; the SLURM array
script generated and run through sbatch/srun/scontrol shims (one torchrun per task)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from _distributed import REPO, subprocess_env

# Real training, probe and torchrun subprocesses: ~93 s of CPU time for the file (measured).
pytestmark = pytest.mark.slow

MICRO = {
    "base": "debug_cpu",
    "overrides": {"train.batch_size": 16, "data.num_workers": 0, "data.shuffle_buffer": 50},
    "shapes": [{"width": 32, "depth": 1, "heads": 2, "pred_width": 16, "pred_depth": 1}],
    "metrics": ["knn_err"],
    "probe": {"device": "cpu", "num_workers": 0, "k": 5},
}


def sweep(*args, env=None, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "scalejepa.sweep.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**subprocess_env(), **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def records(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    """One shape, budgets of 4 and 8 steps, WSD with the 4-step run branched at step 2."""
    root = tmp_path_factory.mktemp("sweep")
    spec = root / "micro.yaml"
    spec.write_text(json.dumps({**MICRO, "budgets": {"unit": "steps", "values": [4, 8]},
                                "schedule": {"kind": "wsd", "branch": True, "decay_fraction": 0.5,
                                             "warmup_fraction": 0.0}}))
    out = root / "sweep"
    sweep("plan", spec, "--out", out)
    first = sweep("run", out, "--parallel", "2")
    return out, first


def test_micro_sweep_runs_branches_and_collects(branched):
    out, first = branched
    assert "1 jobs to run, 0 finished already" in first and "FAILED" not in first
    short, long = (sorted((out / "runs").iterdir(), key=lambda p: p.name)[i] for i in (0, 1))
    assert short.name.endswith("T4_s0") and long.name.endswith("T8_s0")
    s, lg = records(short), records(long)
    assert sorted(s) == [3, 4] and sorted(lg) == list(range(1, 9))
    # The branch resumed the long run's step-2 checkpoint: same weights, same batch, same loss at step 3.
    assert s[3]["loss"] == lg[3]["loss"]
    assert s[3]["lr"] < lg[3]["lr"] == lg[1]["lr"]  # its cool-down had begun, the long run's not
    sweep("collect", out)
    rows = {r["steps"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert sorted(rows) == [4, 8]
    for steps, row in rows.items():
        assert row["images"] == steps * 16
        assert row["flops"] == pytest.approx(row["flops_planned"], rel=0.1)  # logged masks vs sampled masks
        assert 0 < row["knn_err"] < 1 and row["params"] == row["params_encoder"] > row["params_non_embedding"]
        assert row["device"] == "cpu" and row["config"]["model"]["arch"] == "custom"
        assert row["final_train_loss"] > 0
    assert rows[4]["branch_of"] == long.name and rows[4]["branch_step"] == 2


def test_rerun_skips_finished_runs(branched):
    out, _ = branched
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/sweep_result.json")}
    again = sweep("run", out)
    assert "0 jobs to run, 1 finished already (skipped)" in again
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/sweep_result.json")}


SBATCH_SHIM = """#!/usr/bin/env bash
# Runs every task of the script's --array on this machine, one after another.
script="$1"
array=$(sed -n 's/^#SBATCH --array=//p' "$script")
echo "Submitted batch job 4242"
for task in ${array//,/ }; do
  SLURM_ARRAY_JOB_ID=4242 SLURM_JOB_ID=4242 SLURM_ARRAY_TASK_ID=$task SLURM_JOB_NODELIST=localhost \\
    SLURM_NNODES=1 bash "$script" > "$(dirname "$script")/task_$task.out" 2>&1 || exit 1
done
"""


def test_slurm_array_through_shims(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH_SHIM)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    spec = tmp_path / "one.yaml"
    spec.write_text(json.dumps({**MICRO, "budgets": {"unit": "steps", "values": [3]},
                                "slurm": {"nodes": 1, "gpus_per_node": 1, "time": "00:10:00", "partition": "debug"}}))
    out = tmp_path / "sweep"
    sweep("plan", spec, "--out", out)
    sweep("run", out, "--launcher", "slurm", "--no-submit")
    script = (out / "slurm" / "sweep.sbatch").read_text()
    for line in ("#SBATCH --array=0", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=1", "#SBATCH --time=00:10:00",
                 "#SBATCH --partition=debug", "#SBATCH --requeue", "--launcher slurm"):
        assert line in script
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    submitted = sweep("run", out, "--launcher", "slurm",
                      env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "RDZV_PORT": str(port)})
    assert "Submitted batch job 4242" in submitted
    (run,) = (out / "runs").iterdir()
    result = json.loads((run / "sweep_result.json").read_text())
    assert result["launcher"] == "slurm" and 0 < result["metrics"]["knn_err"] < 1
    log = (run / "sweep.log").read_text()
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=1 --rdzv-backend=c10d" in log
    assert f"--rdzv-endpoint=localhost:{port} --rdzv-id=4242_0" in log and "--resume auto" in log
    assert sorted(records(run)) == [1, 2, 3]
