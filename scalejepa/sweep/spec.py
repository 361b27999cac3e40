"""Sweep specs: typed dataclasses read from YAML, every key checked.

A spec is a base preset plus overrides for every run, a grid of model shapes, compute
budgets (FLOPs, steps or images seen), seeds, the schedule, the probe data and the
metrics. Unknown keys, values of the wrong type and impossible combinations raise
:class:`SweepSpecError` naming the key, before anything is planned or run.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

METRICS = ("knn_err", "linear_err")


class SweepSpecError(ValueError):
    """A sweep spec problem the user can fix; the message says how."""


@dataclass
class ShapeSpec:
    """One model shape: a named size (``arch: vit_small``) or a custom encoder shape."""

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


@dataclass
class BudgetSpec:
    unit: Literal["flops", "steps", "images"] = "flops"
    values: list[float] = field(default_factory=list)


@dataclass
class ScheduleSpec:
    kind: Literal["cosine", "wsd"] = "cosine"
    warmup_fraction: float = 0.05  # of each run's steps (of the shortest run of a branched group)
    decay_fraction: float = 0.2  # wsd only
    # wsd only: one long run per shape and seed, shorter budgets branched from its checkpoints.
    branch: bool = False


@dataclass
class ProbeSpec:
    train_shards: str = "builtin:mnist5k:train"
    val_shards: str = "builtin:mnist5k:val"
    k: int = 20
    linear_epochs: int = 20
    batch_size: int = 256
    num_workers: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EstimateSpec:
    # Where the plan's wall-time column comes from. gpus (KIND:NODESxPER_NODE, as
    # scalejepa-plan takes it; its world size must equal `ranks`): each shape's step is
    # traced and priced by scalejepa-plan (predicted). Empty: an achieved throughput of
    # gflops_per_s per run (model FLOPs), for CPU sweeps, which the planner does not price.
    # `collect` records the measured throughput either way.
    gpus: str = ""
    gflops_per_s: float = 50.0


@dataclass
class SlurmSpec:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 32
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""


@dataclass
class SweepSpec:
    name: str = ""
    base: str = "debug_cpu"  # preset name or YAML path
    overrides: dict[str, Any] = field(default_factory=dict)  # section.key: value, every run
    shapes: list[ShapeSpec] = field(default_factory=list)
    budgets: BudgetSpec = field(default_factory=BudgetSpec)
    seeds: list[int] = field(default_factory=lambda: [0])
    metrics: list[str] = field(default_factory=lambda: ["knn_err", "linear_err"])
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    estimate: EstimateSpec = field(default_factory=EstimateSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    ranks: int = 1  # processes per run (mask truncation, hence FLOPs, depends on the per-rank batch)
    log_every: int = 1  # metrics.jsonl windows: FLOPs are summed window by window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def spec_names() -> list[str]:
    folder = resources.files("scalejepa.configs.sweeps")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def spec_path(name_or_path: str) -> Path:
    """A shipped spec name (``cpu_demo``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise SweepSpecError(f"sweep spec {name_or_path!r} does not exist")
        return candidate
    path = Path(str(resources.files("scalejepa.configs.sweeps") / f"{name_or_path}.yaml"))
    if not path.is_file():
        raise SweepSpecError(f"unknown sweep spec {name_or_path!r}; shipped: {', '.join(spec_names())} "
                             "(or pass a path to a YAML file)")
    return path


def load_spec(name_or_path: str) -> SweepSpec:
    path = spec_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepSpecError(f"{path}: not valid YAML: {exc}") from None
    spec = spec_from_dict(raw)
    if not spec.name:
        spec.name = path.stem
    return spec


def spec_from_dict(raw: Any) -> SweepSpec:
    spec = _build(SweepSpec, raw, "")
    check_spec(spec)
    return spec


def check_spec(spec: SweepSpec) -> None:
    """Checks of single values and of combinations that need no model or data."""
    if not spec.shapes:
        raise SweepSpecError("shapes: give at least one model shape (e.g. {width: 64, depth: 4, heads: 2})")
    if not spec.budgets.values:
        raise SweepSpecError("budgets.values: give at least one compute budget")
    if any(v <= 0 for v in spec.budgets.values):
        raise SweepSpecError(f"budgets.values={spec.budgets.values}: every budget must be > 0")
    if len(set(spec.budgets.values)) != len(spec.budgets.values):
        raise SweepSpecError(f"budgets.values={spec.budgets.values} repeats a budget")
    if not spec.seeds:
        raise SweepSpecError("seeds: give at least one seed")
    unknown = [m for m in spec.metrics if m not in METRICS]
    if unknown or not spec.metrics:
        raise SweepSpecError(f"metrics={spec.metrics}: choose from {', '.join(METRICS)}")
    for key, value in spec.overrides.items():
        if "." not in str(key):
            raise SweepSpecError(f"overrides: key {key!r} must look like section.key (e.g. optim.lr)")
    s = spec.schedule
    if not 0 <= s.warmup_fraction < 1:
        raise SweepSpecError(f"schedule.warmup_fraction={s.warmup_fraction} must be in [0, 1)")
    if not 0 < s.decay_fraction <= 1:
        raise SweepSpecError(f"schedule.decay_fraction={s.decay_fraction} must be in (0, 1]")
    if s.branch and s.kind != "wsd":
        raise SweepSpecError("schedule.branch=true needs schedule.kind=wsd (cosine runs depend on their length "
                             "from the first step and cannot be branched)")
    for name in ("ranks", "log_every"):
        if getattr(spec, name) < 1:
            raise SweepSpecError(f"{name} must be >= 1")
    if spec.estimate.gflops_per_s <= 0:
        raise SweepSpecError("estimate.gflops_per_s must be > 0")
    if spec.estimate.gpus:
        from scalejepa.plan.hardware import parse_cluster  # only GPU sweeps need the planner's table

        try:
            cluster = parse_cluster(spec.estimate.gpus)
        except ValueError as exc:
            raise SweepSpecError(f"estimate.gpus: {exc}") from None
        if cluster.world_size != spec.ranks:
            raise SweepSpecError(f"estimate.gpus={spec.estimate.gpus} has {cluster.world_size} GPUs but each run "
                                 f"has ranks={spec.ranks}: give the cluster of one run")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the sweep spec"
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise SweepSpecError(f"unknown sweep spec key {prefix}{key}{hint}; keys of {where}: {', '.join(names)}")
        kwargs[key] = _value(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise SweepSpecError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SweepSpecError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise SweepSpecError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SweepSpecError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise SweepSpecError(f"{key}={value!r} must be an integer")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # YAML reads 1e12 (no dot) as a string
        except (TypeError, ValueError):
            raise SweepSpecError(f"{key}={value!r} must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SweepSpecError(f"{key}={value!r} must be a string")
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"sweep spec field {key} has an unsupported type {tp}")
