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

import dataclasses
import json
import time
from typing import Any

from scalejepa import flops
from scalejepa.config import ConfigError, load_config
from scalejepa.data.cache import resolve_shards
from scalejepa.data.shard_index import ShardIndexError
from scalejepa.schedules import wsd_branch_step
from scalejepa.sweep.records import Action, Plan, PlannedRun
from scalejepa.sweep.spec import ShapeSpec, SweepSpec, SweepSpecError


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
    for key in ("train_shards", "val_shards"):
        value = getattr(spec.probe, key)
        if not value:
            raise SweepSpecError(f"probe.{key} is empty: give a labeled shard set (e.g. builtin:mnist5k:train)")
        try:
            resolve_shards(value)
        except (ValueError, FileNotFoundError, ShardIndexError) as exc:
            raise SweepSpecError(f"probe.{key}={value!r}: the probe data set is missing or unreadable: {exc}") from None


def plan_sweep(spec: SweepSpec, spec_source: str = "") -> Plan:
    check_probe_data(spec)
    s = spec.schedule
    runs: list[PlannedRun] = []
    jobs: list[tuple[Action, ...]] = []
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
                members.append(PlannedRun(
                    name=name, shape=shape.label(), shape_spec=shape, seed=seed, budget=value,
                    budget_unit=spec.budgets.unit, steps=steps, warmup_steps=warmup,
                    batch_size=probe.train.batch_size, images=steps * probe.train.batch_size,
                    flops_per_image_est=per_image, flops_est=steps * per_step, step_s_est=step_s, params=params,
                    base=spec.base, overrides=overrides,
                ))
            if s.branch:
                members, job = _branch_job(members, s.decay_fraction)
                jobs.append(job)
            else:
                jobs += [(Action("run", m.name),) for m in members]
            runs += members
    return Plan(name=spec.name, spec_source=spec_source, spec=spec,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), runs=tuple(runs), jobs=tuple(jobs))


def _step_time_estimator(spec: SweepSpec):
    """Seconds per optimizer step of a run's config: scalejepa-plan's predicted step on
    ``estimate.gpus``, or the step's FLOPs at ``estimate.gflops_per_s``."""
    cluster = spec.estimate.cluster()
    if cluster is None:
        return lambda config, step_flops: step_flops / (spec.estimate.gflops_per_s * 1e9)
    from scalejepa.plan.planner import step_seconds  # traces on fake tensors: GPU sweeps only

    return lambda config, step_flops: step_seconds(config, cluster)


def _steps(spec: SweepSpec, value: float, per_step: float, batch: int, shape: ShapeSpec) -> int:
    unit = spec.budgets.unit
    steps = round(value / per_step) if unit == "flops" else round(value) if unit == "steps" else round(value / batch)
    if steps < 1:
        need = {"flops": f"{per_step:.3g} FLOPs", "steps": "1 step", "images": f"{batch} images"}[unit]
        raise SweepSpecError(f"budget {value:g} {unit} is too small for one step of shape {shape.label()} "
                             f"(one step of batch {batch} costs {need}): raise the budget or shrink the batch")
    return steps


def _branch_job(members: list[PlannedRun], decay_fraction: float) -> tuple[list[PlannedRun], tuple[Action, ...]]:
    """One job: the longest run in segments, each shorter run branched at its decay start.
    Returns the runs (the shorter ones now branches of the longest) and the job."""
    longest = members[-1]
    branched, actions = [], []
    for run in members[:-1]:
        branch = wsd_branch_step(run.steps, decay_fraction)
        if branch < run.warmup_steps:
            raise SweepSpecError(f"run {run.name}: its decay would start at step {branch}, inside the "
                                 f"{run.warmup_steps}-step warm-up; lower schedule.warmup_fraction or raise the budget")
        if branch < 1:
            raise SweepSpecError(f"run {run.name}: {run.steps} steps leave no stable phase to branch from; "
                                 "raise the smallest budget")
        branched.append(dataclasses.replace(run, parent=longest.name, from_step=branch))
        actions += [Action("segment", longest.name, stop_at=branch), Action("run", run.name)]
    return branched + [longest], (*actions, Action("run", longest.name))


def format_table(plan: Plan) -> str:
    head = (f"{'run':<36} {'enc params':>10} {'steps':>6} {'images':>8} {'GFLOP/img':>9} {'FLOPs':>9} "
            f"{'est wall':>9}  branch")
    lines = [head, "-" * len(head)]
    for r in plan.runs:
        branch = f"from {r.parent} @ {r.from_step}" if r.parent else ""
        lines.append(f"{r.name:<36} {r.params['encoder']:>10,} {r.steps:>6} {r.images:>8} "
                     f"{r.flops_per_image_est / 1e9:>9.4f} {r.flops_est:>9.3g} {r.est_wall_s:>8.0f}s  {branch}")
    t = plan.totals()
    lines.append(f"{t['runs']} runs in {len(plan.jobs)} jobs, {t['flops_of_runs']:.3g} FLOPs of runs, "
                 f"{t['flops_to_train']:.3g} to train; est. {t['est_wall_s'] / 60:.1f} min of training from "
                 f"{t['est_source']} (probes and start-up not included)")
    return "\n".join(lines)
