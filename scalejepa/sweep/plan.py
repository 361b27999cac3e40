"""Expand a sweep spec into runs: configs, steps, FLOPs, wall-time estimates, jobs.

Every run's config is built and validated (shape, batch, masks) and the probe data
resolved before ``plan.json`` is written, so a bad spec fails here and not hours into a
sweep. A budget in FLOPs becomes steps through the analytic FLOPs per image of the
run's shape at its per-rank batch (``scalejepa.flops.expected_flops_per_image``, from
sampled masks); the FLOPs a run really spent are recomputed from its logs by ``collect``.

Jobs are what a launcher runs: one run each, except with ``schedule.branch`` (WSD): one
job per shape and seed trains the longest run in segments, stopping at each shorter
run's branch point (its checkpoint there), and trains each shorter run as a cool-down
from that checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from scalejepa import flops
from scalejepa.config import ConfigError, load_config
from scalejepa.schedules import wsd_branch_step
from scalejepa.sweep.spec import ShapeSpec, SweepSpec, SweepSpecError

PLAN_FORMAT = "scalejepa-sweep-plan"
PLAN_VERSION = 1


def override_text(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def run_overrides(spec: SweepSpec, shape: ShapeSpec, seed: int, steps: int, warmup: int, keep: int) -> list[str]:
    """The ``section.key=value`` overrides of one run, on top of the base preset."""
    s = spec.schedule
    fixed = {
        "train.steps": steps, "train.seed": seed, "train.log_every": spec.log_every,
        "optim.schedule": s.kind, "optim.decay_fraction": s.decay_fraction,
        # The warm-up is a step count (warmup_epochs=0 hands it to optim.warmup_steps).
        "optim.warmup_epochs": 0, "optim.warmup_steps": warmup,
        # Checkpoints only where a run stops (its end, or a branch point), never pruned away
        # before the branches that start from them have run.
        "checkpoint.interval": 0, "checkpoint.keep": keep,
        "eval.knn_every": 0,  # the sweep probes once, at the end
    }
    return ([override_text(k, v) for k, v in spec.overrides.items()] + shape.overrides()
            + [override_text(k, v) for k, v in fixed.items()])


def budget_label(unit: str, value: float) -> str:
    tag = {"flops": "C", "steps": "T", "images": "I"}[unit]
    return tag + (f"{value:.2g}".replace("+", "") if unit == "flops" else str(int(value)))


def _config(spec: SweepSpec, overrides: list[str], what: str):
    try:
        config = load_config(spec.base, overrides)
    except ConfigError as exc:
        raise SweepSpecError(f"{what}: {exc}") from None
    if config.train.batch_size % spec.ranks:
        raise SweepSpecError(f"{what}: train.batch_size={config.train.batch_size} does not split over ranks={spec.ranks}")
    return config


def check_probe_data(spec: SweepSpec) -> None:
    """The labeled shard sets the probes need must resolve (a builtin set is built now)."""
    from scalejepa.data.cache import resolve_shards
    from scalejepa.data.shard_index import ShardIndexError

    for key in ("train_shards", "val_shards"):
        value = getattr(spec.probe, key)
        if not value:
            raise SweepSpecError(f"probe.{key} is empty: give a labeled shard set (e.g. builtin:mnist5k:train)")
        try:
            resolve_shards(value)
        except (ValueError, FileNotFoundError, ShardIndexError) as exc:
            raise SweepSpecError(f"probe.{key}={value!r}: the probe data set is missing or unreadable: {exc}") from None


def plan_sweep(spec: SweepSpec, spec_source: str = "") -> dict[str, Any]:
    check_probe_data(spec)
    s = spec.schedule
    runs: list[dict[str, Any]] = []
    jobs: list[list[dict[str, Any]]] = []
    step_seconds = _step_time_estimator(spec)
    for seed in spec.seeds:
        for shape in spec.shapes:
            probe = _config(spec, run_overrides(spec, shape, seed, 1, 0, 1), f"shape {shape.label()}")
            per_rank = probe.train.batch_size // spec.ranks
            per_image = flops.expected_flops_per_image(probe, per_rank)
            per_step = per_image * probe.train.batch_size
            group = []
            for value in sorted(spec.budgets.values):
                steps = _steps(spec, value, per_step, probe.train.batch_size, shape)
                group.append((value, steps))
            seen = {}
            for value, steps in group:
                if steps in seen:
                    raise SweepSpecError(f"shape {shape.label()}: budgets {seen[steps]:g} and {value:g} both give "
                                         f"{steps} steps; space the budgets further apart")
                seen[steps] = value
            warmups = [round(s.warmup_fraction * steps) for _, steps in group]
            if s.branch:
                warmups = [min(warmups)] * len(group)  # one warm-up for the long run and its branches
            keep = len(group) if s.branch else 1
            params = flops.param_counts(probe)
            step_s = step_seconds(probe, per_step)
            members = []
            for (value, steps), warmup in zip(group, warmups):
                overrides = run_overrides(spec, shape, seed, steps, warmup, keep)
                name = f"{shape.label()}_{budget_label(spec.budgets.unit, value)}_s{seed}"
                _config(spec, overrides, f"run {name}")
                members.append({
                    "name": name, "shape": shape.label(), "shape_spec": vars(shape), "seed": seed,
                    "budget": value, "budget_unit": spec.budgets.unit, "steps": steps, "warmup_steps": warmup,
                    "batch_size": probe.train.batch_size, "images": steps * probe.train.batch_size,
                    "flops_per_image_est": per_image, "flops_est": steps * per_step, "step_s_est": step_s,
                    "params": params, "base": spec.base, "overrides": overrides,
                    "parent": None, "from_step": None,
                })
            runs += members
            jobs += _branch_jobs(members, s.decay_fraction) if s.branch else [[{"kind": "run", "run": m["name"]}]
                                                                               for m in members]
    total = sum(r["flops_est"] for r in runs)
    spent = sum(r["flops_est"] - (r["from_step"] or 0) * r["batch_size"] * r["flops_per_image_est"] for r in runs)
    wall = sum((r["steps"] - (r["from_step"] or 0)) * r["step_s_est"] for r in runs)
    return {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "name": spec.name, "spec_source": spec_source,
        "spec": spec.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs, "jobs": jobs,
        "totals": {"runs": len(runs), "flops_of_runs": total, "flops_to_train": spent,
                   "est_wall_s": wall, "est_source": _estimate_source(spec)},
    }


def _step_time_estimator(spec: SweepSpec):
    """Seconds per optimizer step of a run's config: scalejepa-plan's predicted step on
    ``estimate.gpus``, or the step's FLOPs at ``estimate.gflops_per_s``."""
    if not spec.estimate.gpus:
        return lambda config, step_flops: step_flops / (spec.estimate.gflops_per_s * 1e9)
    from scalejepa.plan.hardware import parse_cluster  # traces on fake tensors: GPU sweeps only
    from scalejepa.plan.planner import step_seconds

    cluster = parse_cluster(spec.estimate.gpus)
    return lambda config, step_flops: step_seconds(config, cluster)


def _estimate_source(spec: SweepSpec) -> str:
    if spec.estimate.gpus:
        return f"scalejepa-plan on {spec.estimate.gpus} (predicted)"
    return f"an assumed {spec.estimate.gflops_per_s:g} GFLOP/s per run (estimate.gflops_per_s)"


def _steps(spec: SweepSpec, value: float, per_step: float, batch: int, shape: ShapeSpec) -> int:
    unit = spec.budgets.unit
    steps = round(value / per_step) if unit == "flops" else round(value) if unit == "steps" else round(value / batch)
    if steps < 1:
        need = {"flops": f"{per_step:.3g} FLOPs", "steps": "1 step", "images": f"{batch} images"}[unit]
        raise SweepSpecError(f"budget {value:g} {unit} is too small for one step of shape {shape.label()} "
                             f"(one step of batch {batch} costs {need}): raise the budget or shrink the batch")
    return steps


def _branch_jobs(members: list[dict[str, Any]], decay_fraction: float) -> list[list[dict[str, Any]]]:
    """One job: the longest run in segments, each shorter run branched at its decay start."""
    longest = members[-1]
    actions = []
    for run in members[:-1]:
        branch = wsd_branch_step(run["steps"], decay_fraction)
        if branch < run["warmup_steps"]:
            raise SweepSpecError(f"run {run['name']}: its decay would start at step {branch}, inside the "
                                 f"{run['warmup_steps']}-step warm-up; lower schedule.warmup_fraction or raise the budget")
        if branch < 1:
            raise SweepSpecError(f"run {run['name']}: {run['steps']} steps leave no stable phase to branch from; "
                                 "raise the smallest budget")
        run["parent"], run["from_step"] = longest["name"], branch
        actions += [{"kind": "segment", "run": longest["name"], "stop_at": branch}, {"kind": "run", "run": run["name"]}]
    return [actions + [{"kind": "run", "run": longest["name"]}]]


def write_json(path: Path, obj: Any) -> None:
    """Atomically: a temp file, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def load_plan(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / "plan.json"
    if not path.is_file():
        raise SweepSpecError(f"{path} does not exist: run `scalejepa-sweep plan SPEC --out {sweep_dir}` first")
    plan = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise SweepSpecError(f"{path} is not a scalejepa-sweep plan")
    return plan


def format_table(plan: dict[str, Any]) -> str:
    head = (f"{'run':<36} {'enc params':>10} {'steps':>6} {'images':>8} {'GFLOP/img':>9} {'FLOPs':>9} "
            f"{'est wall':>9}  branch")
    lines = [head, "-" * len(head)]
    for r in plan["runs"]:
        trained = r["steps"] - (r["from_step"] or 0)
        wall = trained * r["step_s_est"]
        branch = f"from {r['parent']} @ {r['from_step']}" if r["parent"] else ""
        lines.append(f"{r['name']:<36} {r['params']['encoder']:>10,} {r['steps']:>6} {r['images']:>8} "
                     f"{r['flops_per_image_est'] / 1e9:>9.4f} {r['flops_est']:>9.3g} {wall:>8.0f}s  {branch}")
    t = plan["totals"]
    lines.append(f"{t['runs']} runs in {len(plan['jobs'])} jobs, {t['flops_of_runs']:.3g} FLOPs of runs, "
                 f"{t['flops_to_train']:.3g} to train; est. {t['est_wall_s'] / 60:.1f} min of training from "
                 f"{t['est_source']} (probes and start-up not included)")
    return "\n".join(lines)


def check_probe_data_of(plan: dict[str, Any]) -> None:
    """The probe data of a written plan must still resolve before any run starts."""
    from scalejepa.sweep.spec import spec_from_dict

    check_probe_data(spec_from_dict(plan["spec"]))
