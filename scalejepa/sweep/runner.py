"""Run a planned sweep: a worker per job, launched locally or as a SLURM array.

A job's worker (``scalejepa-sweep worker DIR --job I``) trains each of its runs with
``scalejepa.train`` in a subprocess (``--resume auto``: an interrupted run continues from
its last checkpoint), probes the target encoder with ``scalejepa.eval.cli`` (kNN, linear)
and writes ``RUN/sweep_result.json`` last, atomically: a run with that file is finished
and skipped, so re-running a sweep resumes it.

``local``: up to ``--parallel`` workers at a time as subprocesses of this process.
``slurm``: ``DIR/slurm/sweep.sbatch``, one array task per job, each training with
``srun`` + ``torchrun`` (c10d rendezvous on the task's first node), submitted with ``sbatch``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scalejepa.layout import committed_step_dirs, step_of
from scalejepa.sweep.plan import load_plan, write_json

log = logging.getLogger("scalejepa.sweep")
RESULT_FILE = "sweep_result.json"


class SweepRunError(RuntimeError):
    pass


def run_dir(sweep_dir: Path, name: str) -> Path:
    return Path(sweep_dir) / "runs" / name


def is_finished(sweep_dir: Path, name: str) -> bool:
    return (run_dir(sweep_dir, name) / RESULT_FILE).is_file()


# ----------------------------------------------------------------------------- one job


def train_command(run: dict[str, Any], out: Path, resume: str, launcher: str, extra: list[str] = ()) -> list[str]:
    args = ["--config", run["base"], "--run-dir", str(out), "--resume", resume, *run["overrides"], *extra]
    if launcher == "slurm":
        return slurm_torchrun_prefix() + ["-m", "scalejepa.train", *args]
    return [sys.executable, "-m", "scalejepa.train", *args]


def slurm_torchrun_prefix() -> list[str]:
    """srun + torchrun over the task's nodes, as launch/slurm.sbatch does for one run."""
    env = os.environ
    nodes = env.get("SLURM_NNODES", "1")
    head = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")], check=True,
                          capture_output=True, text=True).stdout.split()[0]
    job = f"{env.get('SLURM_ARRAY_JOB_ID', env.get('SLURM_JOB_ID', '0'))}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", f"--nodes={nodes}",
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
            f"--nproc-per-node={env.get('GPUS_PER_NODE', env.get('SLURM_GPUS_ON_NODE', '1'))}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{env.get('RDZV_PORT', '29500')}", f"--rdzv-id={job}",
            "--max-restarts=0"]


def _checkpoint_at(folder: Path, step: int) -> Path | None:
    for path in committed_step_dirs(folder):
        if step_of(path) == step:
            return path
    return None


def _run_logged(cmd: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as f:
        f.write(f"\n+ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SweepRunError(f"`{shlex.join(cmd[:6])} ...` exited with {code}; see {log_path}")


def train_run(sweep_dir: Path, run: dict[str, Any], launcher: str, stop_at: int = 0) -> float:
    """Train ``run`` (to ``stop_at`` if given); returns the wall time spent."""
    out = run_dir(sweep_dir, run["name"])
    resume = "auto"
    if run["parent"] and not committed_step_dirs(out / "checkpoints"):  # a branch's first start
        parent = run_dir(sweep_dir, run["parent"]) / "checkpoints"
        found = _checkpoint_at(parent, run["from_step"])
        if found is None:
            raise SweepRunError(f"run {run['name']} branches from {run['parent']} at step {run['from_step']}, "
                                f"but {parent} has no committed checkpoint there")
        resume = str(found)
    extra = [f"train.stop_at_step={stop_at}"] if stop_at else []
    start = time.monotonic()
    _run_logged(train_command(run, out, resume, launcher, extra), out / "sweep.log")
    return time.monotonic() - start


def probe_run(sweep_dir: Path, run: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """kNN and/or linear probe of the run's target encoder, as error rates in [0, 1]."""
    out, p = run_dir(sweep_dir, run["name"]), spec["probe"]
    common = ["--weights", str(out), "--train-shards", p["train_shards"], "--val-shards", p["val_shards"],
              "--batch-size", str(p["batch_size"]), "--num-workers", str(p["num_workers"]), "--device", p["device"]]
    protocols = {"knn_err": ("knn", ["--k", str(p["k"])]), "linear_err": ("linear", ["--epochs", str(p["linear_epochs"])])}
    results = {}
    for metric in spec["metrics"]:
        protocol, args = protocols[metric]
        path = out / f"probe_{protocol}.json"
        start = time.monotonic()
        _run_logged([sys.executable, "-m", "scalejepa.eval.cli", protocol, *common, *args, "--out", str(path)],
                    out / "sweep.log")
        result = json.loads(path.read_text())
        results[metric] = 1.0 - result["top1"] / 100.0
        results[f"{protocol}_top1"] = result["top1"]
        results[f"{protocol}_seconds"] = time.monotonic() - start
    return results


def held_out_runs(plan: dict[str, Any]) -> set[str]:
    """The largest budget's runs: what ``--hold-out-largest`` leaves for later (a forecast)."""
    largest = max(r["budget"] for r in plan["runs"])
    return {r["name"] for r in plan["runs"] if r["budget"] == largest}


def run_job(sweep_dir: Path, job: int, launcher: str = "local", hold_out_largest: bool = False) -> None:
    """Execute job ``job`` of the plan: its segments and runs, skipping finished runs (and,
    with ``hold_out_largest``, the largest budget's: a branched job then stops at its last
    branch point, and a later call resumes the long run from there)."""
    from scalejepa.flops import device_name

    plan = load_plan(sweep_dir)
    if not 0 <= job < len(plan["jobs"]):
        raise SweepRunError(f"job {job} does not exist: the plan has jobs 0..{len(plan['jobs']) - 1}")
    runs = {r["name"]: r for r in plan["runs"]}
    skip = held_out_runs(plan) if hold_out_largest else set()
    train_wall: dict[str, float] = {}
    for action in plan["jobs"][job]:
        run = runs[action["run"]]
        if is_finished(sweep_dir, run["name"]) or (action["kind"] == "run" and run["name"] in skip):
            continue
        if action["kind"] == "segment":
            if _checkpoint_at(run_dir(sweep_dir, run["name"]) / "checkpoints", action["stop_at"]) is None:
                train_wall[run["name"]] = train_wall.get(run["name"], 0.0) + train_run(
                    sweep_dir, run, launcher, stop_at=action["stop_at"])
            continue
        log.info("sweep: training %s (%d steps)", run["name"], run["steps"])
        wall = train_wall.get(run["name"], 0.0) + train_run(sweep_dir, run, launcher)
        metrics = probe_run(sweep_dir, run, plan["spec"])
        result = {"run": run["name"], "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "train_wall_s": wall, "device": device_name(), "launcher": launcher, "metrics": metrics}
        write_json(run_dir(sweep_dir, run["name"]) / RESULT_FILE, result)
        log.info("sweep: %s done: %s", run["name"], {k: round(v, 4) for k, v in metrics.items() if k.endswith("_err")})


# ----------------------------------------------------------------------------- launchers


def pending_jobs(sweep_dir: Path, plan: dict[str, Any], hold_out_largest: bool = False) -> list[int]:
    skip = held_out_runs(plan) if hold_out_largest else set()
    return [i for i, job in enumerate(plan["jobs"])
            if not all(is_finished(sweep_dir, a["run"]) for a in job if a["kind"] == "run" and a["run"] not in skip)]


def run_local(sweep_dir: Path, parallel: int = 1, hold_out_largest: bool = False) -> list[int]:
    """Workers for the unfinished jobs, ``parallel`` at a time; returns the failed jobs."""
    plan = load_plan(sweep_dir)
    todo = pending_jobs(sweep_dir, plan, hold_out_largest)
    skipped = len(plan["jobs"]) - len(todo)
    print(f"scalejepa-sweep: {len(todo)} jobs to run, {skipped} finished already (skipped), {parallel} at a time",
          flush=True)
    env = dict(os.environ)
    # Parallel workers on one machine: split its cores unless the user chose.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    logs = Path(sweep_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[int, subprocess.Popen] = {}
    failed = []
    queue = list(todo)
    # Interrupted (Ctrl-C, or SIGTERM from a scheduler or a timeout): stop every worker's
    # process group, its training and probe subprocesses included; a re-run resumes.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        while queue or running:
            while queue and len(running) < parallel:
                job = queue.pop(0)
                with (logs / f"job_{job:04d}.log").open("a") as f:
                    running[job] = subprocess.Popen(
                        [sys.executable, "-m", "scalejepa.sweep.cli", "worker", str(sweep_dir), "--job", str(job)]
                        + (["--hold-out-largest"] if hold_out_largest else []),
                        stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            time.sleep(0.2)
            _reap(running, plan, failed, logs)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in running.values():
            os.killpg(proc.pid, signal.SIGTERM)
    return failed


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _reap(running: dict[int, subprocess.Popen], plan: dict[str, Any], failed: list[int], logs: Path) -> None:
    """Report the workers that have exited and forget them."""
    for job, proc in list(running.items()):
        code = proc.poll()
        if code is None:
            continue
        del running[job]
        names = ", ".join(a["run"] for a in plan["jobs"][job] if a["kind"] == "run")
        if code:
            failed.append(job)
            print(f"scalejepa-sweep: job {job} ({names}) FAILED (exit {code}); see {logs}/job_{job:04d}.log",
                  flush=True)
        else:
            print(f"scalejepa-sweep: job {job} ({names}) finished", flush=True)


def slurm_script(sweep_dir: Path, plan: dict[str, Any], jobs: list[int], hold_out_largest: bool = False) -> str:
    s = plan["spec"]["slurm"]
    sweep_dir = Path(sweep_dir).resolve()
    lines = [
        "#!/usr/bin/env bash",
        f"# scalejepa-sweep {plan['name']}: one array task per job of {sweep_dir}/plan.json. Each task",
        "# trains its runs with srun + torchrun (--resume auto: a requeued task continues) and probes them.",
        f"#SBATCH --job-name=sweep-{plan['name']}",
        f"#SBATCH --array={','.join(map(str, jobs))}",
        f"#SBATCH --nodes={s['nodes']}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={s['gpus_per_node']}",
        f"#SBATCH --cpus-per-task={s['cpus_per_task']}",
        f"#SBATCH --time={s['time']}",
        "#SBATCH --requeue",
        f"#SBATCH --output={sweep_dir}/logs/slurm-%A_%a.out",
    ]
    lines += [f"#SBATCH --{key}={s[key]}" for key in ("partition", "account") if s[key]]
    lines += [
        "set -euo pipefail",
        f"export GPUS_PER_NODE=${{GPUS_PER_NODE:-{s['gpus_per_node']}}}",
        f"cd {shlex.quote(os.getcwd())}",
        f'exec {shlex.quote(sys.executable)} -m scalejepa.sweep.cli worker {shlex.quote(str(sweep_dir))} '
        '--job "$SLURM_ARRAY_TASK_ID" --launcher slurm' + (" --hold-out-largest" if hold_out_largest else ""),
    ]
    return "\n".join(lines) + "\n"


def run_slurm(sweep_dir: Path, submit: bool = True, hold_out_largest: bool = False) -> Path:
    """Write ``DIR/slurm/sweep.sbatch`` for the unfinished jobs and submit it with sbatch."""
    plan = load_plan(sweep_dir)
    jobs = pending_jobs(sweep_dir, plan, hold_out_largest)
    if not jobs:
        raise SweepRunError(f"every run of {sweep_dir} is finished: nothing to submit")
    path = Path(sweep_dir) / "slurm" / "sweep.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(sweep_dir) / "logs").mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(slurm_script(sweep_dir, plan, jobs, hold_out_largest))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    if submit:
        proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        if proc.returncode:
            raise SweepRunError(f"sbatch {path} failed ({proc.returncode}): {proc.stderr.strip()}")
        print(proc.stdout.strip(), flush=True)
    return path
