"""One row per finished run: ``DIR/runs.jsonl``.

FLOPs are recomputed from what the run logged, window by window: each ``metrics.jsonl``
record holds the mean context tokens and target tokens per image of the steps since the
previous record, and ``scalejepa.flops.step_flops_per_image`` turns them into model
FLOPs (the convention of ``scalejepa.flops``: matmuls, 2 per multiply-add, backward 2 x
forward for the trained parts, the target encoder forward only). With the reference
masks (one block size per batch, contexts truncated to the batch minimum) a one-step
window (``log_every: 1``) is exact; a longer window averages the attention term's
squared lengths over its steps (10-step windows of the cpu_demo shapes: 0.02-0.1% low,
measured on sampled masks). Under several ranks the token counts are rank 0's.

A branched run (WSD cool-down) is charged its parent's FLOPs up to the branch step plus
its own. ``images`` is the images seen (the fits' D); ``unique_images`` and ``epochs`` say
how much of it repeats the training set. ``params`` is the encoder's parameter count (the model that is probed); the
predictor's and the non-embedding counts are recorded next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scalejepa import flops
from scalejepa.config import load_config
from scalejepa.data.cache import builtin_shards, resolve_shards
from scalejepa.io import atomic_write_text
from scalejepa.layout import RunDir, SweepDir
from scalejepa.sweep.records import PlannedRun, RunResult, load_plan

FLOPS_CONVENTION = ("scalejepa.flops model FLOPs of training (target fwd + context fwd/bwd + predictor fwd/bwd, "
                    "matmuls only); params = encoder parameters")


class CollectError(RuntimeError):
    pass


def _scalar(record: dict[str, Any], name: str) -> float:
    """A logged scalar by its JSON-line name (last component) or its full name."""
    for key in (name.rsplit("/", 1)[-1], name):
        if key in record:
            return float(record[key])
    raise CollectError(f"metrics record at step {record.get('step')} has no {name!r}")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CollectError(f"{path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def window_totals(config, records: list[dict[str, Any]], start_step: int, end_step: int) -> dict[str, float]:
    """Model FLOPs, images and loop seconds of the steps (start_step, end_step] from the log."""
    batch, targets = config.train.batch_size, config.mask.num_targets
    total = {"flops": 0.0, "images": 0, "loop_s": 0.0}
    prev = start_step
    for record in sorted(records, key=lambda r: r["step"]):
        step = record["step"]
        if step <= start_step or step > end_step:
            continue
        steps = step - prev
        per_image = flops.step_flops_per_image(config, _scalar(record, "train/context_tokens"),
                                               _scalar(record, "train/target_tokens") / targets)
        total["flops"] += steps * batch * per_image
        total["images"] += steps * batch
        total["loop_s"] += steps * _scalar(record, "perf/step_time_s")
        prev = step
    if prev != end_step:
        raise CollectError(f"the log covers steps {start_step}..{prev}, not ..{end_step}: the run is incomplete")
    return total


def images_per_epoch(config) -> int | None:
    """Images in the run's training set (its shard index's count), None where unknown."""
    if config.data.synthetic:
        return None
    if config.data.num_samples:
        return config.data.num_samples
    spec = config.data.shards or str(builtin_shards(config.data.builtin, split="train"))
    return (resolve_shards(spec)[1] or {}).get("samples")


def _logged(run: RunDir):
    """A run's resolved config and its metrics records."""
    return load_config(str(run.config)), read_metrics(run.metrics)


def collect_row(sweep: SweepDir, run: PlannedRun) -> dict[str, Any]:
    result = RunResult.load(sweep, run.name)
    config, records = _logged(sweep.run(run.name))
    start = run.from_step or 0
    own = window_totals(config, records, start, run.steps)
    if run.parent:
        inherited = window_totals(*_logged(sweep.run(run.parent)), 0, start)
        own = {k: own[k] + inherited[k] for k in own}
    counts = flops.param_counts(config)
    last = max(records, key=lambda r: r["step"])
    epoch = images_per_epoch(config)
    return {
        "run": run.name, "shape": run.shape, "seed": run.seed,
        "budget": run.budget, "budget_unit": run.budget_unit, "steps": run.steps,
        "params": counts["encoder"], "params_encoder": counts["encoder"], "params_predictor": counts["predictor"],
        "params_non_embedding": counts["encoder_non_embedding"],
        "flops": own["flops"], "flops_planned": run.flops_est, "images": own["images"],
        # images seen (the law's D) against distinct images: past ~4 epochs repeats are worth
        # less than new images (Muennighoff et al. 2023), and D becomes ambiguous.
        "unique_images": None if epoch is None else min(own["images"], epoch), "images_per_epoch": epoch,
        "epochs": None if not epoch else own["images"] / epoch,
        "train_loop_s": own["loop_s"], "train_wall_s": result.train_wall_s, "device": result.device,
        **result.metrics,
        "final_train_loss": _scalar(last, "train/loss"),  # recorded; not comparable across sizes, never fitted
        "branch_of": run.parent, "branch_step": run.from_step,
        "flops_convention": FLOPS_CONVENTION, "finished": result.finished, "config": config.to_dict(),
    }


def collect(sweep: SweepDir) -> tuple[Path, int, list[str]]:
    """Write DIR/runs.jsonl; returns its path, the row count and the unfinished runs."""
    plan = load_plan(sweep)
    rows, missing = [], []
    for run in plan.runs:
        if sweep.is_finished(run.name):
            rows.append(collect_row(sweep, run))
        else:
            missing.append(run.name)
    path = atomic_write_text(sweep.rows, "".join(json.dumps(row) + "\n" for row in rows))
    return path, len(rows), missing


def read_rows(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CollectError(f"{path} does not exist: run `scalejepa-sweep collect DIR` first, or pass --runs FILE.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
