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

from scalejepa.flops import device_name
from scalejepa.io import atomic_write_text
from scalejepa.layout import RunDir, SweepDir, committed_step_dirs, is_committed
from scalejepa.sweep.records import Plan, PlannedRun, RunResult, load_plan
from scalejepa.sweep.spec import SweepSpec

log = logging.getLogger("scalejepa.sweep")


class SweepRunError(RuntimeError):
    pass


def launched_ranks(spec: SweepSpec, launcher: str) -> int:
    """Training processes per run that ``launcher`` starts: one locally (``python -m
    scalejepa.train``), slurm.nodes x slurm.gpus_per_node under SLURM (srun + torchrun)."""
    return 1 if launcher == "local" else spec.slurm.nodes * spec.slurm.gpus_per_node


def check_ranks(spec: SweepSpec, launcher: str, started: int | None = None) -> None:
    """The processes a run starts must be the ``ranks`` the plan assumed: the per-rank batch
    sets the mask truncation, hence the FLOPs of every step and the budgets' step counts."""
    started = launched_ranks(spec, launcher) if started is None else started
    if started == spec.ranks:
        return
    fix = ("set ranks: 1 in the spec and plan again, or run it with --launcher slurm" if launcher == "local" else
           f"make slurm.nodes x slurm.gpus_per_node (and GPUS_PER_NODE, where it is set) {spec.ranks}, or set "
           f"ranks: {started}, in the spec and plan again")
    raise SweepRunError(f"the plan assumes ranks={spec.ranks} processes per run (its per-rank batch and FLOPs), but "
                        f"the {launcher} launcher starts {started}: {fix}")


# ----------------------------------------------------------------------------- one job


def train_command(run: PlannedRun, out: RunDir, resume: str, launcher: str, extra: list[str] = ()) -> list[str]:
    args = ["--config", run.base, "--run-dir", str(out.root), "--resume", resume, *run.overrides, *extra]
    if launcher == "slurm":
        return slurm_torchrun_prefix() + ["-m", "scalejepa.train", *args]
    return [sys.executable, "-m", "scalejepa.train", *args]


def slurm_processes() -> tuple[int, int]:
    """(nodes, processes per node) of this SLURM task, as torchrun will start them."""
    env = os.environ
    return int(env.get("SLURM_NNODES", "1")), int(env.get("GPUS_PER_NODE", env.get("SLURM_GPUS_ON_NODE", "1")))


def slurm_torchrun_prefix() -> list[str]:
    """srun + torchrun over the task's nodes, as launch/slurm.sbatch does for one run."""
    env = os.environ
    nodes, per_node = slurm_processes()
    head = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")], check=True,
                          capture_output=True, text=True).stdout.split()[0]
    job = f"{env.get('SLURM_ARRAY_JOB_ID', env.get('SLURM_JOB_ID', '0'))}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", f"--nodes={nodes}",
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{env.get('RDZV_PORT', '29500')}", f"--rdzv-id={job}",
            "--max-restarts=0"]


def _checkpoint_at(run: RunDir, step: int) -> Path | None:
    path = run.step_dir(step)
    return path if is_committed(path) else None


def _run_logged(cmd: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as f:
        f.write(f"\n+ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SweepRunError(f"`{shlex.join(cmd[:6])} ...` exited with {code}; see {log_path}")


def train_run(sweep: SweepDir, run: PlannedRun, launcher: str, stop_at: int = 0) -> float:
    """Train ``run`` (to ``stop_at`` if given); returns the wall time spent."""
    out = sweep.run(run.name)
    resume = "auto"
    if run.parent and not committed_step_dirs(out.checkpoints):  # a branch's first start
        parent = sweep.run(run.parent)
        found = _checkpoint_at(parent, run.from_step)
        if found is None:
            raise SweepRunError(f"run {run.name} branches from {run.parent} at step {run.from_step}, "
                                f"but {parent.checkpoints} has no committed checkpoint there")
        resume = str(found)
    extra = [f"train.stop_at_step={stop_at}"] if stop_at else []
    start = time.monotonic()
    _run_logged(train_command(run, out, resume, launcher, extra), sweep.run_log(run.name))
    return time.monotonic() - start


def probe_run(sweep: SweepDir, run: PlannedRun, spec: SweepSpec) -> dict[str, float]:
    """kNN and/or linear probe of the run's target encoder, as error rates in [0, 1]."""
    p = spec.probe
    common = ["--weights", str(sweep.run(run.name).root), "--train-shards", p.train_shards,
              "--val-shards", p.val_shards, "--batch-size", str(p.batch_size), "--num-workers", str(p.num_workers),
              "--device", p.device]
    protocols = {"knn_err": ("knn", ["--k", str(p.k)]), "linear_err": ("linear", ["--epochs", str(p.linear_epochs)])}
    results = {}
    for metric in spec.metrics:
        protocol, args = protocols[metric]
        path = sweep.probe_result(run.name, protocol)
        start = time.monotonic()
        _run_logged([sys.executable, "-m", "scalejepa.eval.cli", protocol, *common, *args, "--out", str(path)],
                    sweep.run_log(run.name))
        result = json.loads(path.read_text())
        results[metric] = 1.0 - result["top1"] / 100.0
        results[f"{protocol}_top1"] = result["top1"]
        results[f"{protocol}_seconds"] = time.monotonic() - start
    return results


def run_job(sweep: SweepDir, job: int, launcher: str = "local", hold_out_largest: bool = False) -> None:
    """Execute job ``job`` of the plan: its segments and runs, skipping finished runs (and,
    with ``hold_out_largest``, the largest budget's: a branched job then stops at its last
    branch point, and a later call resumes the long run from there)."""
    plan = load_plan(sweep)
    if not 0 <= job < len(plan.jobs):
        raise SweepRunError(f"job {job} does not exist: the plan has jobs 0..{len(plan.jobs) - 1}")
    check_ranks(plan.spec, launcher, started=None if launcher == "local" else _slurm_world())
    skip = plan.held_out() if hold_out_largest else set()
    train_wall: dict[str, float] = {}
    for action in plan.jobs[job]:
        run = plan.run(action.run)
        if sweep.is_finished(run.name) or (action.kind == "run" and run.name in skip):
            continue
        if action.kind == "segment":
            if _checkpoint_at(sweep.run(run.name), action.stop_at) is None:
                train_wall[run.name] = train_wall.get(run.name, 0.0) + train_run(
                    sweep, run, launcher, stop_at=action.stop_at)
            continue
        log.info("sweep: training %s (%d steps)", run.name, run.steps)
        wall = train_wall.get(run.name, 0.0) + train_run(sweep, run, launcher)
        metrics = probe_run(sweep, run, plan.spec)
        RunResult(run=run.name, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), train_wall_s=wall,
                  device=device_name(), launcher=launcher, metrics=metrics).save(sweep)
        log.info("sweep: %s done: %s", run.name, {k: round(v, 4) for k, v in metrics.items() if k.endswith("_err")})


def _slurm_world() -> int:
    nodes, per_node = slurm_processes()
    return nodes * per_node


# ----------------------------------------------------------------------------- launchers


def pending_jobs(sweep: SweepDir, plan: Plan, hold_out_largest: bool = False) -> list[int]:
    skip = plan.held_out() if hold_out_largest else set()
    return [i for i, job in enumerate(plan.jobs)
            if not all(sweep.is_finished(name) for name in plan.job_runs(job) if name not in skip)]


def run_local(sweep: SweepDir, parallel: int = 1, hold_out_largest: bool = False) -> list[int]:
    """Workers for the unfinished jobs, ``parallel`` at a time; returns the failed jobs."""
    plan = load_plan(sweep)
    check_ranks(plan.spec, "local")
    todo = pending_jobs(sweep, plan, hold_out_largest)
    skipped = len(plan.jobs) - len(todo)
    print(f"scalejepa-sweep: {len(todo)} jobs to run, {skipped} finished already (skipped), {parallel} at a time",
          flush=True)
    env = dict(os.environ)
    # Parallel workers on one machine: split its cores unless the user chose.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    sweep.logs.mkdir(parents=True, exist_ok=True)
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
                with sweep.job_log(job).open("a") as f:
                    running[job] = subprocess.Popen(
                        [sys.executable, "-m", "scalejepa.sweep.cli", "worker", str(sweep.root), "--job", str(job)]
                        + (["--hold-out-largest"] if hold_out_largest else []),
                        stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            time.sleep(0.2)
            _reap(running, plan, failed, sweep)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in running.values():
            os.killpg(proc.pid, signal.SIGTERM)
    return failed


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _reap(running: dict[int, subprocess.Popen], plan: Plan, failed: list[int], sweep: SweepDir) -> None:
    """Report the workers that have exited and forget them."""
    for job, proc in list(running.items()):
        code = proc.poll()
        if code is None:
            continue
        del running[job]
        names = ", ".join(plan.job_runs(plan.jobs[job]))
        if code:
            failed.append(job)
            print(f"scalejepa-sweep: job {job} ({names}) FAILED (exit {code}); see {sweep.job_log(job)}", flush=True)
        else:
            print(f"scalejepa-sweep: job {job} ({names}) finished", flush=True)


def slurm_script(sweep: SweepDir, plan: Plan, jobs: list[int], hold_out_largest: bool = False) -> str:
    s = plan.spec.slurm
    sweep = SweepDir(sweep.root.resolve())
    lines = [
        "#!/usr/bin/env bash",
        f"# scalejepa-sweep {plan.name}: one array task per job of {sweep.plan}. Each task",
        "# trains its runs with srun + torchrun (--resume auto: a requeued task continues) and probes them.",
        f"#SBATCH --job-name=sweep-{plan.name}",
        f"#SBATCH --array={','.join(map(str, jobs))}",
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={s.gpus_per_node}",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        f"#SBATCH --time={s.time}",
        "#SBATCH --requeue",
        f"#SBATCH --output={sweep.slurm_log_pattern}",
    ]
    lines += [f"#SBATCH --{key}={value}" for key, value in (("partition", s.partition), ("account", s.account))
              if value]
    lines += [
        "set -euo pipefail",
        f"export GPUS_PER_NODE=${{GPUS_PER_NODE:-{s.gpus_per_node}}}",
        f"cd {shlex.quote(os.getcwd())}",
        f'exec {shlex.quote(sys.executable)} -m scalejepa.sweep.cli worker {shlex.quote(str(sweep.root))} '
        '--job "$SLURM_ARRAY_TASK_ID" --launcher slurm' + (" --hold-out-largest" if hold_out_largest else ""),
    ]
    return "\n".join(lines) + "\n"


def run_slurm(sweep: SweepDir, submit: bool = True, hold_out_largest: bool = False) -> Path:
    """Write ``DIR/slurm/sweep.sbatch`` for the unfinished jobs and submit it with sbatch."""
    plan = load_plan(sweep)
    check_ranks(plan.spec, "slurm")
    jobs = pending_jobs(sweep, plan, hold_out_largest)
    if not jobs:
        raise SweepRunError(f"every run of {sweep.root} is finished: nothing to submit")
    sweep.logs.mkdir(parents=True, exist_ok=True)
    path = atomic_write_text(sweep.slurm_script, slurm_script(sweep, plan, jobs, hold_out_largest), mode=0o777)
    if submit:
        proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        if proc.returncode:
            raise SweepRunError(f"sbatch {path} failed ({proc.returncode}): {proc.stderr.strip()}")
        print(proc.stdout.strip(), flush=True)
    return path
