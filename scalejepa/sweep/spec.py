"""Sweep specs: typed, frozen dataclasses read from YAML, every key checked.

A spec is a base preset plus overrides for every run, a grid of model shapes, compute
budgets (FLOPs, steps or images seen), seeds, the schedule, the probe data and the
metrics. Unknown keys, values of the wrong type and impossible combinations raise
:class:`SweepSpecError` naming the key, before anything is planned or run: each part
checks itself when it is built (``scalejepa.schema``, the loader of the configs too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from scalejepa.schema import Checked, Schema

METRICS = ("knn_err", "linear_err")


class SweepSpecError(ValueError):
    """A sweep spec problem the user can fix; the message says how."""


SPEC = Schema("sweep spec", SweepSpecError, package="scalejepa.configs.sweeps", named="sweep spec")


class _Part(Checked):
    SCHEMA = SPEC


@dataclass(frozen=True)
class ShapeSpec(_Part):
    """One model shape: a named size (``arch: vit_small``) or a custom encoder shape."""

    SECTION = "shape"

    arch: str = "custom"
    width: int = 0
    depth: int = 0
    heads: int = 0
    mlp_ratio: float = 4.0
    pred_width: int = 0  # 0: the base preset's model.pred_dim
    pred_depth: int = 0  # 0: the base preset's model.pred_depth
    pred_heads: int = 0  # 0: the base preset's model.pred_heads

    def overrides(self) -> list[str]:
        out = [f"model.arch={self.arch}"]
        if self.arch == "custom":
            out += [f"model.width={self.width}", f"model.depth={self.depth}", f"model.heads={self.heads}",
                    f"model.mlp_ratio={self.mlp_ratio}"]
        for key, value in (("pred_dim", self.pred_width), ("pred_depth", self.pred_depth),
                           ("pred_heads", self.pred_heads)):
            if value:
                out.append(f"model.{key}={value}")
        return out

    def label(self) -> str:
        enc = (f"w{self.width}d{self.depth}h{self.heads}" + (f"m{self.mlp_ratio:g}" if self.mlp_ratio != 4.0 else "")
               if self.arch == "custom" else self.arch)
        pred = "".join(f"{tag}{v}" for tag, v in (("pw", self.pred_width), ("pd", self.pred_depth),
                                                  ("ph", self.pred_heads)) if v)
        return enc + (f"-{pred}" if pred else "")


@dataclass(frozen=True)
class BudgetSpec(_Part):
    SECTION = "budgets"

    unit: Literal["flops", "steps", "images"] = "flops"
    values: tuple[float, ...] = ()

    def _check(self) -> None:
        values = list(self.values)
        if not values:
            raise SweepSpecError("budgets.values: give at least one compute budget")
        if any(v <= 0 for v in values):
            raise SweepSpecError(f"budgets.values={values}: every budget must be > 0")
        if len(set(values)) != len(values):
            raise SweepSpecError(f"budgets.values={values} repeats a budget")


@dataclass(frozen=True)
class ScheduleSpec(_Part):
    SECTION = "schedule"

    kind: Literal["cosine", "wsd"] = "cosine"
    warmup_fraction: float = 0.05  # of each run's steps (of the shortest run of a branched group)
    decay_fraction: float = 0.2  # wsd only
    # wsd only: one long run per shape and seed, shorter budgets branched from its checkpoints.
    branch: bool = False

    def _check(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise SweepSpecError(f"schedule.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0 < self.decay_fraction <= 1:
            raise SweepSpecError(f"schedule.decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.branch and self.kind != "wsd":
            raise SweepSpecError("schedule.branch=true needs schedule.kind=wsd (cosine runs depend on their length "
                                 "from the first step and cannot be branched)")


@dataclass(frozen=True)
class ProbeSpec(_Part):
    SECTION = "probe"

    train_shards: str = "builtin:mnist5k:train"
    val_shards: str = "builtin:mnist5k:val"
    k: int = 20
    linear_epochs: int = 20
    batch_size: int = 256
    num_workers: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class EstimateSpec(_Part):
    SECTION = "estimate"

    # Where the plan's wall-time column comes from. gpus (KIND:NODESxPER_NODE, as
    # scalejepa-plan takes it; its world size must equal `ranks`): each shape's step is
    # traced and priced by scalejepa-plan (predicted). Empty: an achieved throughput of
    # gflops_per_s per run (model FLOPs), for CPU sweeps, which the planner does not price.
    # `collect` records the measured throughput either way.
    gpus: str = ""
    gflops_per_s: float = 50.0

    def _check(self) -> None:
        if self.gflops_per_s <= 0:
            raise SweepSpecError("estimate.gflops_per_s must be > 0")
        self.cluster()  # a GPU kind the planner knows, and a world size

    def cluster(self):
        """The planner's cluster of one run (``estimate.gpus``), None for a CPU sweep."""
        if not self.gpus:
            return None
        from scalejepa.plan.hardware import parse_cluster  # only GPU sweeps need the planner's table

        try:
            return parse_cluster(self.gpus)
        except ValueError as exc:
            raise SweepSpecError(f"estimate.gpus: {exc}") from None

    def source(self) -> str:
        """Where the plan's wall-time column comes from, in words."""
        if self.gpus:
            return f"scalejepa-plan on {self.gpus} (predicted)"
        return f"an assumed {self.gflops_per_s:g} GFLOP/s per run (estimate.gflops_per_s)"


@dataclass(frozen=True)
class SlurmSpec(_Part):
    SECTION = "slurm"

    nodes: int = 1
    gpus_per_node: int = 8  # torchrun processes per node
    cpus_per_task: int = 32
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""

    def _check(self) -> None:
        self._at_least(1, "nodes", "gpus_per_node", "cpus_per_task")


@dataclass(frozen=True)
class SweepSpec(_Part):
    name: str = ""
    base: str = "debug_cpu"  # preset name or YAML path
    overrides: dict[str, Any] = field(default_factory=dict)  # section.key: value, every run
    shapes: tuple[ShapeSpec, ...] = ()
    budgets: BudgetSpec = field(default_factory=BudgetSpec)  # no default budget: the spec gives them
    seeds: tuple[int, ...] = (0,)
    metrics: tuple[str, ...] = ("knn_err", "linear_err")
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    estimate: EstimateSpec = field(default_factory=EstimateSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    ranks: int = 1  # processes per run (mask truncation, hence FLOPs, depends on the per-rank batch)
    log_every: int = 1  # metrics.jsonl windows: FLOPs are summed window by window

    def _check(self) -> None:
        """Checks of combinations that need no model or data (``plan`` builds every run's config)."""
        if not self.shapes:
            raise SweepSpecError("shapes: give at least one model shape (e.g. {width: 64, depth: 4, heads: 2})")
        if not self.seeds:
            raise SweepSpecError("seeds: give at least one seed")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise SweepSpecError(f"metrics={list(self.metrics)}: choose from {', '.join(METRICS)}")
        for key in self.overrides:
            if "." not in str(key):
                raise SweepSpecError(f"overrides: key {key!r} must look like section.key (e.g. optim.lr)")
        self._at_least(1, "ranks", "log_every")
        cluster = self.estimate.cluster()
        if cluster is not None and cluster.world_size != self.ranks:
            raise SweepSpecError(f"estimate.gpus={self.estimate.gpus} has {cluster.world_size} GPUs but each run "
                                 f"has ranks={self.ranks}: give the cluster of one run")

# ----------------------------------------------------------------------------- loading


spec_names = SPEC.names  # the shipped specs (scalejepa/configs/sweeps/*.yaml)
spec_path = SPEC.path  # a shipped spec's name (cpu_demo) or a path to a YAML file -> its path


def load_spec(name_or_path: str) -> SweepSpec:
    path = spec_path(name_or_path)
    raw = SPEC.read_yaml(path)
    if isinstance(raw, dict) and not raw.get("name"):
        raw = {**raw, "name": path.stem}
    return spec_from_dict(raw)


def spec_from_dict(raw: Any) -> SweepSpec:
    return SPEC.build(SweepSpec, raw)
