"""Forecast the largest budget from the smaller ones, before it runs: ``forecast.json``.

A fit that looks good on the budgets it saw proves little; a prediction of a budget that
had not been run is the cheapest honest test of a law (scaling-laws.md). The forecast:

1. holds out the largest budget (the plan's, so it can be made before those runs exist);
2. fits the parametric law ``err = E + A/N^alpha + B/D^beta`` on the smaller budgets' runs;
3. predicts the held-out budget's best error ``err*(C) = min_N err(N, C / (c N))`` and its
   compute-optimal size N_opt(C), each with an 80% profile-likelihood interval
   (``profile.py``); a quantity the rows do not determine is said so in ``undetermined``.

Measured, once the held-out runs are collected: the best error is the lowest error among
them, N_opt the vertex of their IsoFLOP parabola (when it lies inside their sizes). The
forecast **counts** when the measured best error is within 10% (relative) of the predicted
one and the measured N_opt lies inside the predicted interval (a closed one). The
prediction is never refitted once written: a later call only adds the measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from scalejepa.sweep import profile
from scalejepa.sweep.fit import (
    INTERVAL, FitError, exp_or_none, fit_parametric, isoflop_profiles, parametric_intervals, rows_from_dicts,
    undetermined_text,
)

FORMAT = "scalejepa-sweep-forecast"
ERR_TOLERANCE = 0.10  # the measured best error within 10% (relative) of the predicted one


def _same_budget(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def split_rows(rows: Sequence[dict[str, Any]], held_out: float) -> tuple[list[dict], list[dict]]:
    """(rows of budgets below ``held_out``, rows of ``held_out``); every row needs a budget."""
    missing = [r.get("run", i) for i, r in enumerate(rows) if r.get("budget") is None]
    if missing:
        raise FitError(f"rows {missing[:3]} have no budget: a forecast holds out a budget; collect the sweep with "
                       "scalejepa-sweep collect, or give every row a budget")
    train = [r for r in rows if float(r["budget"]) < held_out and not _same_budget(float(r["budget"]), held_out)]
    return train, [r for r in rows if _same_budget(float(r["budget"]), held_out)]


def predict(train: Sequence[dict[str, Any]], metric: str, budget_flops: float) -> dict[str, Any]:
    """The parametric law fitted on ``train``: err* and N_opt at ``budget_flops`` with intervals."""
    rows = rows_from_dicts(train, metric)
    if len(np.unique(rows.budget)) < 2:
        raise FitError(f"the forecast fits the budgets below the held-out one: {len(np.unique(rows.budget))} found; "
                       "give at least 2 (3 or more for a forecast worth checking)")
    par = fit_parametric(rows)
    prof = profile.Profile(par.logs, par.metric, par.theta, par.loss, INTERVAL)
    log_c = par.log_c(budget_flops)
    if par.err_opt(budget_flops) is None:
        raise FitError("the law fitted on the smaller budgets predicts no finite best error at the held-out budget: "
                       "its terms are not determined by these runs (run scalejepa-sweep fit on them to see which)")
    err = prof.interval(profile.err_opt_quantity(log_c))
    n_opt = prof.interval(profile.n_opt_quantity(log_c))
    opened = {name: [end for end, is_open in (("lo", iv.lo_open), ("hi", iv.hi_open)) if is_open]
              for name, iv in (("err", err), ("n_opt", n_opt))}
    law = parametric_intervals(par, budget_flops)
    values = {**par.values, "parametric_exponent": float(par.theta[4] / (par.theta[2] + par.theta[4])),
              "n_opt_parametric": par.n_opt(budget_flops)}
    undetermined = {key: text for key, band in law.items() if (text := undetermined_text(key, values[key], band))}
    if "n_opt_parametric" in undetermined and not opened["n_opt"]:
        undetermined["predicted_n_opt"] = ("the forecast's N_opt rests on parameters the smaller budgets do not "
                                           "determine (see n_opt_parametric)")
    for name, ends in opened.items():
        if ends:
            undetermined[f"predicted_{name}"] = (f"the forecast's {'best error' if name == 'err' else 'N_opt'} is not "
                                                 f"determined by the smaller budgets: its interval stays open "
                                                 f"({' and '.join(ends)}) to the end of the search range")
    residuals = profile.objective_residuals(par.theta, par.logs, np.log(par.metric))
    return {
        "noise_sd": float(np.sqrt(np.sum(residuals**2) / (len(residuals) - len(par.theta)))),
        "predicted_err": par.err_opt(budget_flops), "predicted_err_lo": exp_or_none(err.lo),
        "predicted_err_hi": exp_or_none(err.hi),
        "predicted_n_opt": par.n_opt(budget_flops), "predicted_n_opt_lo": exp_or_none(n_opt.lo + par.log_mean[0]),
        "predicted_n_opt_hi": exp_or_none(n_opt.hi + par.log_mean[0]),
        "open_intervals": {k: v for k, v in opened.items() if v},
        "law": {**par.values, "converged": par.converged, "flops_per_param_image": par.flops_per_param_image,
                "intervals": law},
        "undetermined": undetermined,
        "fit_rows": len(rows), "fit_budgets": sorted(float(b) for b in np.unique(rows.budget)),
        "fit_runs": [r.get("run") for r in train],
    }


def measure(held: Sequence[dict[str, Any]], metric: str, noise_sd: float, draws: int = 400) -> dict[str, Any]:
    """The held-out budget's best error and N_opt from its runs (None where not measured).

    The measured N_opt (a parabola vertex through a few noisy runs) is itself uncertain:
    ``measured_n_opt_lo/hi`` is the 80% range of the vertex over ``draws`` simulated
    repeats of the held-out runs (the fitted parabola times the fit's log-normal noise)."""
    if not held:
        return {"measured_err": None, "measured_n_opt": None, "measured_n_opt_lo": None, "measured_n_opt_hi": None,
                "measured_runs": 0, "measured_n_opt_note": "the held-out budget's runs are not collected yet"}
    rows = rows_from_dicts(held, metric)
    (entry,) = isoflop_profiles(rows) or [None]
    note = ("fewer than 3 distinct sizes: no IsoFLOP parabola" if entry is None else
            f"no minimum: {entry['no_minimum']}" if entry["n_opt"] is None else
            "vertex of the IsoFLOP parabola of the held-out runs")
    spread: tuple[float | None, float | None] = (None, None)
    if entry is not None and entry["n_opt"] is not None:
        x = np.log(rows.params)
        smooth = np.polyval(entry["coeffs"], x)
        rng = np.random.default_rng(0)
        log_vertices = []  # a parabola opening downwards has its "minimum" at one end, far out
        for _ in range(draws):
            q2, q1, _ = np.polyfit(x, smooth * np.exp(noise_sd * rng.standard_normal(len(x))), 2)
            log_vertices.append(-q1 / (2 * q2) if q2 > 0 else (math.inf if q1 < 0 else -math.inf))
        lo, hi = np.percentile(log_vertices, [50 * (1 - INTERVAL), 50 * (1 + INTERVAL)], method="nearest")
        spread = (0.0 if lo == -math.inf else exp_or_none(lo) or math.inf, exp_or_none(hi) if np.isfinite(hi) else None)
    return {"measured_err": float(rows.metric.min()), "measured_n_opt": entry["n_opt"] if entry else None,
            "measured_n_opt_lo": spread[0], "measured_n_opt_hi": spread[1],
            "measured_n_opt_note": note, "measured_runs": len(held),
            "measured_budget_flops": float(np.exp(np.mean(np.log(rows.flops)))),
            "measured_best_run": held[int(np.argmin(rows.metric))].get("run"),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def verdict(f: dict[str, Any]) -> dict[str, Any]:
    """Whether the forecast counts, and why (None while nothing is measured)."""
    if f["measured_err"] is None:
        return {"err_within_tolerance": None, "n_opt_inside": None, "counts": None,
                "why": "not measured yet: run the held-out budget, collect, then run forecast again"}
    if f["predicted_err"] is None:
        return {"err_within_tolerance": False, "n_opt_inside": False, "counts": False,
                "why": "the law predicts no finite best error at this budget (see undetermined)"}
    rel = abs(f["measured_err"] - f["predicted_err"]) / f["predicted_err"]
    err_ok = rel <= ERR_TOLERANCE
    n = f["measured_n_opt"]
    closed = "n_opt" not in f["open_intervals"] and f["predicted_n_opt_hi"] is not None
    n_ok = n is not None and closed and f["predicted_n_opt_lo"] <= n <= f["predicted_n_opt_hi"]
    # Not the verdict: whether the measurement's own noise range meets the predicted interval.
    consistent = (n is not None and closed and f["measured_n_opt_lo"] <= f["predicted_n_opt_hi"]
                  and (f["measured_n_opt_hi"] is None or f["measured_n_opt_hi"] >= f["predicted_n_opt_lo"]))
    why = [f"measured best error {f['measured_err']:.4g} is {100 * rel:.1f}% from the predicted "
           f"{f['predicted_err']:.4g} ({'within' if err_ok else 'outside'} {100 * ERR_TOLERANCE:.0f}%)"]
    if n is None:
        why.append(f"N_opt not measured ({f['measured_n_opt_note']})")
    elif not closed:
        why.append("the predicted N_opt interval is open: it cannot be checked")
    else:
        why.append(f"measured N_opt {n:.4g} is {'inside' if n_ok else 'outside'} the predicted "
                   f"[{f['predicted_n_opt_lo']:.4g}, {f['predicted_n_opt_hi']:.4g}]")
        if not n_ok:
            why.append("the measured vertex's own 80% noise range "
                       f"[{f['measured_n_opt_lo']:.4g}, {_num(f['measured_n_opt_hi'])}] "
                       + ("does" if consistent else "does not") + " meet it")
    return {"err_relative_error": rel, "err_within_tolerance": err_ok, "n_opt_inside": n_ok,
            "n_opt_noise_range_meets_interval": consistent, "counts": err_ok and n_ok, "why": "; ".join(why)}


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.4g}"


def forecast_rows(rows: Sequence[dict[str, Any]], metric: str, held_out: float, budget_flops: float) -> dict[str, Any]:
    """A new forecast of budget ``held_out`` (label; ``budget_flops`` its FLOPs) from the smaller
    budgets' rows, with the measurement if the held-out rows are already among ``rows``."""
    train, held = split_rows(rows, held_out)
    out = {"format": FORMAT, "metric": metric, "budget": held_out, "budget_flops": budget_flops,
           "interval": INTERVAL, "interval_method": "profile likelihood (scalejepa/sweep/profile.py)",
           "err_tolerance": ERR_TOLERANCE,
           "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "made_before_measurement": not held,
           **predict(train, metric, budget_flops)}
    return add_measurement(out, rows)


def add_measurement(forecast: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The forecast with the held-out runs among ``rows`` measured and judged; its prediction as it was."""
    _, held = split_rows(rows, forecast["budget"])
    out = {**forecast, **measure(held, forecast["metric"], forecast["noise_sd"]),
           "measured_vs_law": _law_at(forecast, held)}
    return {**out, **verdict(out)}


def _law_at(forecast: dict[str, Any], held: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each held-out run against the law's prediction at its own size and images."""
    law = forecast["law"]
    out = []
    for r in held:
        predicted = (None if law["A"] is None or law["B"] is None else
                     law["E"] + law["A"] * float(r["params"]) ** -law["alpha"] + law["B"] * float(r["images"]) ** -law["beta"])
        out.append({"run": r.get("run"), "params": r["params"], "images": r["images"], "predicted": predicted,
                    "measured": r[forecast["metric"]]})
    return out


def summary_text(f: dict[str, Any]) -> str:
    def band(key: str) -> str:
        return f"{_num(f[key])} [{_num(f[f'{key}_lo'])}, {_num(f[f'{key}_hi'])}]"

    measured = ("not measured yet" if f["measured_err"] is None else
                f"measured best error {f['measured_err']:.4g}, N_opt "
                + ("n/a" if f["measured_n_opt"] is None else f"{f['measured_n_opt']:.4g}"))
    lines = [f"forecast of {f['metric']} at budget {f['budget']:.4g} ({f['budget_flops']:.3g} FLOPs) from "
             f"{f['fit_rows']} runs of {len(f['fit_budgets'])} smaller budgets (80% profile intervals):",
             f"  predicted best error {band('predicted_err')}", f"  predicted N_opt      {band('predicted_n_opt')}",
             f"  {measured}", f"  counts: {f['counts']} ({f['why']})"]
    lines += [f"  warning: {text}" for text in f["undetermined"].values()]
    return "\n".join(lines)
