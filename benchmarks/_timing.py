"""Timing of whole steps between device synchronisations, and their summary statistics."""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch

from _common import progress


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step_fn, warmup: int, steps: int, device: torch.device, name: str):
    """Run ``warmup + steps`` steps, each between two device syncs (host overhead included,
    as in training); returns (losses of all steps, step times and data times of the timed
    ones). ``step_fn(i)`` returns the loss, or (loss, seconds spent getting the batch).
    Peak-memory statistics restart with the first timed step."""
    losses, times, data_s = [], [], []
    for i in range(warmup + steps):
        if i == warmup:
            progress(f"  {name}: warm-up done, timing {steps} steps")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = step_fn(i)
        loss, t_data = out if isinstance(out, tuple) else (out, 0.0)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            data_s.append(t_data)
        losses.append(loss)
    return losses, times, data_s


def summarise_times(times_s: list[float]) -> dict:
    """Median, mean, p10/p90, min/max and spread of step times, in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)

    def pct(p):
        k = (len(ms) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    return {"step_ms_median": statistics.median(ms), "step_ms_mean": statistics.fmean(ms),
            "step_ms_p10": pct(0.1), "step_ms_p90": pct(0.9), "step_ms_min": ms[0], "step_ms_max": ms[-1],
            "step_ms_stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
