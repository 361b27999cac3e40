"""Fit the planner to a measured step: ``scalejepa-plan --calibrate train_step_X.json``.

``benchmarks/train_step.py`` writes, per measured variant, the GPU time of each phase of one
profiled step (``phases_ms``: target_forward, context_predictor, backward, optimizer, ema;
the CUDA time under our ``record_function`` labels), the overrides that select the variant
(``overrides``, on top of the file's preset and ``settings.overrides``), and its micro-batch. For each such variant the planner predicts the same step on one
GPU of the file's kind; a phase's efficiency is the median over variants of predicted /
measured time (the share of the roofline that phase reaches), and the report prints the
planner's error on every variant before and after the fit. Later plans divide each phase's
roofline time by its efficiency.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from scalejepa.config import ConfigError, load_config
from scalejepa.plan.hardware import GPU_KINDS, Cluster
from scalejepa.plan.timeline import schedule
from scalejepa.plan.trace import PHASES, trace_step

CALIBRATED_PHASES = ("target_forward", "context_predictor", "backward", "optimizer", "ema")


def kind_of_device(name: str) -> str:
    """The GPU kind whose ``device_name`` torch printed (``torch.cuda.get_device_name``)."""
    for kind in GPU_KINDS.values():
        if kind.device_name.lower() == name.lower():
            return kind.kind
    raise ConfigError(f"--calibrate: the results were measured on {name!r}, which matches no GPU kind "
                      f"({', '.join(g.device_name for g in GPU_KINDS.values())}); add it to "
                      "scalejepa/plan/hardware.py")


def measured_variants(data: dict) -> list[dict]:
    variants = [v for v in data.get("variants", []) if v.get("phases_ms")]
    if not variants:
        raise ConfigError("--calibrate: no variant of this file has phases_ms (one profiled step per variant, "
                          "written by benchmarks/train_step.py since the planner exists): rerun it on the GPU")
    return variants


def calibrate(path: str | Path) -> dict:
    """Per-phase efficiencies from a train_step results file, and the planner's error on
    each of its variants before and after applying them."""
    data = json.loads(Path(path).read_text())
    cluster = Cluster(GPU_KINDS[kind_of_device(data["env"]["device"])], 1, 1)
    settings = data["settings"]
    predictions = []
    for variant in measured_variants(data):
        overrides = [*settings.get("overrides", []), *variant.get("overrides", []),
                     f"train.batch_size={variant['batch']}", "train.grad_accum=1"]
        trace = trace_step(load_config(settings["preset"], overrides), 1)
        predictions.append((variant, trace))
    ratios = {phase: [] for phase in CALIBRATED_PHASES}
    for variant, trace in predictions:
        predicted = schedule(trace, cluster).phases_s
        for phase in CALIBRATED_PHASES:
            measured = variant["phases_ms"].get(phase)
            if measured:
                ratios[phase].append(predicted[phase] / (measured / 1e3))
    efficiency = {phase: statistics.median(r) for phase, r in ratios.items() if r}
    rows = []
    for variant, trace in predictions:
        before = schedule(trace, cluster).step_s
        after = schedule(trace, cluster, efficiency).step_s
        measured = sum(variant["phases_ms"].get(p, 0.0) for p in PHASES) / 1e3
        rows.append({"variant": variant["variant"], "measured_phases_s": measured,
                     "measured_step_s": variant.get("step_ms_median", float("nan")) / 1e3,
                     "predicted_s": before, "error_pct": 100 * (before / measured - 1),
                     "calibrated_s": after, "calibrated_error_pct": 100 * (after / measured - 1)})
    return {"source": str(path), "gpu": cluster.gpu.kind, "efficiency": efficiency, "variants": rows}


def calibration_text(result: dict) -> str:
    lines = [f"calibration from {result['source']} ({result['gpu']}): phase efficiency (share of the roofline) "
             + ", ".join(f"{p} {e:.2f}" for p, e in result["efficiency"].items())]
    for row in result["variants"]:
        lines.append(f"  {row['variant']:<24} measured {1e3 * row['measured_phases_s']:7.1f} ms  predicted "
                     f"{1e3 * row['predicted_s']:7.1f} ms ({row['error_pct']:+.0f}%)  calibrated "
                     f"{1e3 * row['calibrated_s']:7.1f} ms ({row['calibrated_error_pct']:+.0f}%)")
    return "\n".join(lines)
