"""What a sweep writes and reads back, typed: the plan (``plan.json``) and a finished
run's result (``RUN/sweep_result.json``).

``plan`` makes a :class:`Plan`; ``run``, ``collect``, ``forecast`` and the SLURM script
read it through :func:`load_plan`. Both files stay JSON (a person reads them too); they
are checked key by key when read (``scalejepa.schema``), so a plan that loads is one
whose runs and jobs agree. Plan files of format version 1 are this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scalejepa.io import atomic_write_json
from scalejepa.layout import SweepDir
from scalejepa.schema import Checked, Schema, to_plain
from scalejepa.sweep.spec import ShapeSpec, SweepSpec, SweepSpecError

PLAN_FORMAT = "scalejepa-sweep-plan"
PLAN_VERSION = 1

PLAN = Schema("sweep plan", SweepSpecError)
RESULT = Schema("sweep result", SweepSpecError)


class _PlanPart(Checked):
    SCHEMA = PLAN


@dataclass(frozen=True)
class PlannedRun(_PlanPart):
    """One training run of the sweep and what the plan expects of it."""

    name: str
    shape: str  # the shape's label (ShapeSpec.label)
    shape_spec: ShapeSpec
    seed: int
    budget: float  # in budget_unit
    budget_unit: Literal["flops", "steps", "images"]
    steps: int
    warmup_steps: int
    batch_size: int  # global
    images: int
    flops_per_image_est: float  # analytic, from sampled masks at the per-rank batch
    flops_est: float
    step_s_est: float
    params: dict[str, int]  # scalejepa.flops.param_counts
    base: str  # the preset
    overrides: tuple[str, ...]  # section.key=value on top of it
    parent: str | None = None  # a WSD branch: the run it starts from, at from_step
    from_step: int | None = None

    def _check(self) -> None:
        if (self.parent is None) != (self.from_step is None):
            raise SweepSpecError(f"run {self.name}: a branch needs both parent and from_step "
                                 f"(got {self.parent!r}, {self.from_step!r})")

    @property
    def trained_steps(self) -> int:
        """The steps this run trains itself (a branch inherits its parent's first ones)."""
        return self.steps - (self.from_step or 0)

    @property
    def flops_to_train(self) -> float:
        return self.trained_steps * self.batch_size * self.flops_per_image_est

    @property
    def est_wall_s(self) -> float:
        return self.trained_steps * self.step_s_est


@dataclass(frozen=True)
class Action(_PlanPart):
    """One step of a job: train ``run`` to ``stop_at`` (a segment of a long run, up to a
    branch point), or train it to its end and probe it (``kind`` run)."""

    kind: Literal["segment", "run"]
    run: str
    stop_at: int | None = None

    def _check(self) -> None:
        if (self.kind == "segment") != (self.stop_at is not None):
            raise SweepSpecError(f"job action {self.kind} of {self.run}: stop_at is for segments only, and every "
                                 f"segment needs one (got {self.stop_at!r})")


@dataclass(frozen=True)
class Plan(_PlanPart):
    name: str
    spec_source: str
    spec: SweepSpec
    created: str
    runs: tuple[PlannedRun, ...]
    jobs: tuple[tuple[Action, ...], ...]

    def _check(self) -> None:
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise SweepSpecError(f"plan {self.name}: run names repeat")
        for job in self.jobs:
            for action in job:
                if action.run not in names:
                    raise SweepSpecError(f"plan {self.name}: a job names run {action.run}, which is not planned")

    def run(self, name: str) -> PlannedRun:
        return next(r for r in self.runs if r.name == name)

    @staticmethod
    def job_runs(job: tuple[Action, ...]) -> list[str]:
        """The runs a job finishes (trains to the end and probes)."""
        return [a.run for a in job if a.kind == "run"]

    @property
    def largest_budget(self) -> float:
        return max(r.budget for r in self.runs)

    def held_out(self) -> set[str]:
        """The largest budget's runs: what ``--hold-out-largest`` leaves for later (a forecast)."""
        return {r.name for r in self.runs if r.budget == self.largest_budget}

    def totals(self) -> dict[str, Any]:
        return {"runs": len(self.runs), "flops_of_runs": sum(r.flops_est for r in self.runs),
                "flops_to_train": sum(r.flops_to_train for r in self.runs),
                "est_wall_s": sum(r.est_wall_s for r in self.runs), "est_source": self.spec.estimate.source()}

    def to_json(self) -> dict[str, Any]:
        # totals: for the reader of the file; recomputed from the runs when it is loaded.
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **to_plain(self), "totals": self.totals()}

    @classmethod
    def from_json(cls, raw: Any, source: Path | str) -> Plan:
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise SweepSpecError(f"{source} is not a scalejepa-sweep plan")
        if raw.get("version") != PLAN_VERSION:
            raise SweepSpecError(f"{source} is a version {raw.get('version')} plan; this scalejepa reads version "
                                 f"{PLAN_VERSION}: plan the sweep again with this version (into a new directory)")
        fields = {k: v for k, v in raw.items() if k not in ("format", "version", "totals")}
        return PLAN.build(cls, fields)


def save_plan(plan: Plan, sweep: SweepDir) -> Path:
    return atomic_write_json(sweep.plan, plan.to_json())


def load_plan(sweep: SweepDir) -> Plan:
    path = sweep.plan
    if not path.is_file():
        raise SweepSpecError(f"{path} does not exist: run `scalejepa-sweep plan SPEC --out {sweep.root}` first")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SweepSpecError(f"{path} is not valid JSON: {exc}") from None
    return Plan.from_json(raw, path)


@dataclass(frozen=True)
class RunResult(Checked):
    """A finished run: written last, once it is trained and probed (its presence marks it finished)."""

    SCHEMA = RESULT

    run: str
    finished: str  # UTC, ISO 8601
    train_wall_s: float
    device: str
    launcher: Literal["local", "slurm"]
    metrics: dict[str, float]  # knn_err, knn_top1, knn_seconds, linear_err, ...

    def save(self, sweep: SweepDir) -> Path:
        return atomic_write_json(sweep.result(self.run), to_plain(self))

    @classmethod
    def load(cls, sweep: SweepDir, name: str) -> RunResult:
        path = sweep.result(name)
        try:
            return RESULT.build(cls, json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SweepSpecError(f"{path}: cannot read the run's result: {exc}") from None
