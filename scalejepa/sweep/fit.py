"""Scaling-law fits of a downstream error metric, with bootstrap intervals.

* IsoFLOP (Hoffmann et al. 2022, approach 2): per compute budget, a parabola of the
  metric in log(params); its minimum is N_opt(C); then N_opt = k C^a by least squares in
  log-log across budgets.
* Parametric (approach 3): ``err(N, D) = E + A / N^alpha + B / D^beta`` (N params, D
  images seen), a Huber loss (delta 1e-3) on log error, summed over rows and scaled by
  1 / delta^2 so that L-BFGS-B's relative stopping test is not met by a loss that is
  merely small (the early stop Besiroglu et al. 2024 found in the original fit), with
  analytic gradients and tight tolerances, from the best points of a grid of starts.
  With C = c N D (c: the sweep's median FLOPs per parameter per image; I-JEPA's c is not
  6, see ``scalejepa.flops``), the compute-optimal size is
  ``N_opt = G (C / c)^(beta / (alpha + beta))``, ``G = (alpha A / (beta B))^(1 / (alpha + beta))``.
* Frontier: ``err(C) = E + A C^-alpha`` through each budget's best run (Huber on log error).
* Uncertainty: a bootstrap over rows (resample with replacement, refit everything);
  80% intervals (10th-90th percentile) on every exponent and on N_opt at a stated
  budget. Refits that fail (no convergence, too few distinct sizes left) are counted and
  reported, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
INTERVAL = 0.8
# On the 1/delta^2-scaled loss: gtol 1e-8 is 1e-14 on the plain Huber sum. scipy's default
# (1e-5 unscaled) stops a warm-started bootstrap refit at its start: intervals collapse.
_LBFGS = {"maxiter": 5000, "ftol": 1e-12, "gtol": 1e-8}


class FitError(ValueError):
    """The rows cannot support the fit; the message says what is missing."""


@dataclass(frozen=True)
class Rows:
    params: np.ndarray  # N
    images: np.ndarray  # D
    flops: np.ndarray  # C
    metric: np.ndarray  # error in (0, inf)
    budget: np.ndarray  # group label per row (the planned budget, or clustered FLOPs)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(self.params[index], self.images[index], self.flops[index], self.metric[index], self.budget[index])

    def __len__(self) -> int:
        return len(self.metric)


def rows_from_dicts(rows: Sequence[dict[str, Any]], metric: str = "knn_err") -> Rows:
    """Rows need ``params``, ``flops``, ``images`` and the metric; ``budget`` groups the
    IsoFLOP profiles when present (else FLOPs within 30% of each other are one budget)."""
    if not rows:
        raise FitError("no rows to fit: collect a sweep first (scalejepa-sweep collect DIR)")
    for i, row in enumerate(rows):
        missing = [k for k in ("params", "flops", "images", metric) if row.get(k) is None]
        if missing:
            raise FitError(f"row {i} ({row.get('run', 'unnamed')}) has no {', '.join(missing)}: every row needs params, "
                           f"flops, images and the metric {metric!r} (choose another with --metric)")
    values = {k: np.array([float(r[k]) for r in rows]) for k in ("params", "flops", "images", metric)}
    for key, arr in values.items():
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise FitError(f"{key} must be finite and > 0 in every row (a log is taken); got {arr[(arr <= 0) | ~np.isfinite(arr)][:3]}")
    if all(r.get("budget") is not None for r in rows):
        budget = np.array([float(r["budget"]) for r in rows])
    else:
        budget = cluster_budgets(values["flops"])
    return Rows(values["params"], values["images"], values["flops"], values[metric], budget)


def cluster_budgets(flops: np.ndarray, ratio: float = 1.3) -> np.ndarray:
    """Group FLOPs that lie within ``ratio`` of the previous one (sorted): one label each."""
    order = np.argsort(flops)
    labels = np.empty(len(flops))
    start = flops[order[0]]
    for i in order:
        if flops[i] > start * ratio:
            start = flops[i]
        labels[i] = start
    return labels


# ----------------------------------------------------------------------------- Huber on log error


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber values and derivatives, scaled by 1 / delta^2."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)) / delta**2
    grad = np.where(small, r, delta * np.sign(r)) / delta**2
    return value, grad


def _sum_of_powers(theta: np.ndarray, logs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(E + sum_j exp(a_j) x_j^-p_j) and its Jacobian in theta = (e, a_1, p_1, a_2, p_2, ...);
    ``logs``: (terms, rows), log x_j."""
    terms = [np.full(logs.shape[1], theta[0])]
    for j in range(logs.shape[0]):
        terms.append(theta[1 + 2 * j] - theta[2 + 2 * j] * logs[j])
    stack = np.stack(terms)
    top = stack.max(0)
    weights = np.exp(stack - top)
    total = weights.sum(0)
    weights /= total
    jac = np.empty((len(theta), logs.shape[1]))
    jac[0] = weights[0]
    for j in range(logs.shape[0]):
        jac[1 + 2 * j] = weights[1 + j]
        jac[2 + 2 * j] = -weights[1 + j] * logs[j]
    return top + np.log(total), jac


def _objective(theta, logs, log_y, delta):
    pred, jac = _sum_of_powers(theta, logs)
    value, grad = _huber(pred - log_y, delta)
    return value.sum(), jac @ grad


def _grid_losses(grid: np.ndarray, logs: np.ndarray, log_y: np.ndarray, delta: float) -> np.ndarray:
    """Objective at every grid point at once: (points,)."""
    terms = [np.broadcast_to(grid[:, :1], (len(grid), logs.shape[1]))]
    for j in range(logs.shape[0]):
        terms.append(grid[:, 1 + 2 * j, None] - grid[:, 2 + 2 * j, None] * logs[j][None])
    stack = np.stack(terms)
    top = stack.max(0)
    pred = top + np.log(np.exp(stack - top).sum(0))
    return _huber(pred - log_y[None], delta)[0].sum(1)


def _start_grid(terms: int) -> np.ndarray:
    e = np.array([-6.0, -3.0, -1.5, -0.5, 0.5])
    a = np.array([0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0])
    p = np.array([0.05, 0.15, 0.3, 0.6, 1.0, 1.5])
    axes = [e] + [a, p] * terms
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def _bounds(terms: int) -> list[tuple[float, float]]:
    return [(-20.0, 5.0)] + [(-20.0, 80.0), (1e-3, 5.0)] * terms


@dataclass
class PowerFit:
    theta: np.ndarray  # (e, a_1, p_1, ...)
    loss: float
    converged: bool


def fit_sum_of_powers(logs: np.ndarray, y: np.ndarray, *, delta: float = HUBER_DELTA, starts: int = 6,
                      extra_starts: Sequence[np.ndarray] = ()) -> PowerFit:
    """Fit log y ~ log(E + sum_j A_j x_j^-p_j) from the ``starts`` best grid points (+ extra)."""
    log_y = np.log(y)
    picks = [np.asarray(s, float) for s in extra_starts]  # a bootstrap refit: the full-data optimum
    if starts:
        grid = _start_grid(logs.shape[0])
        picks += [grid[i] for i in np.argsort(_grid_losses(grid, logs, log_y, delta))[:starts]]
    results = []
    for start in picks:
        res = minimize(_objective, start, args=(logs, log_y, delta), jac=True, method="L-BFGS-B",
                       bounds=_bounds(logs.shape[0]), options=_LBFGS)
        if np.all(np.isfinite(res.x)) and np.isfinite(res.fun):
            results.append(res)
    if not results:
        return PowerFit(np.full(len(picks[0]), np.nan), math.inf, False)
    # Starts that reach the same optimum differ only in how L-BFGS-B stopped there: among
    # the optima equal to the best up to rounding, take one that converged, if any did.
    best_fun = min(r.fun for r in results)
    at_best = [r for r in results if r.fun <= best_fun + 1e-9 * max(1.0, abs(best_fun))]
    best = next((r for r in at_best if _converged(r)), min(at_best, key=lambda r: r.fun))
    return PowerFit(best.x, float(best.fun), _converged(best))


def _converged(res) -> bool:
    # ABNORMAL_TERMINATION in the line search at the optimum is scipy's usual report of a
    # converged fit at these tolerances: accept it when the projected gradient is small.
    return bool(res.success) or float(np.max(np.abs(res.jac))) < 1e-3 * max(1.0, abs(res.fun))


# ----------------------------------------------------------------------------- the three fits


def check_parametric(rows: Rows) -> None:
    if len(rows) < 8:
        raise FitError(f"{len(rows)} rows: the parametric law has 5 parameters; give at least 8 runs "
                       "(e.g. 3 budgets x 3 sizes)")
    for name, arr in (("params", rows.params), ("images", rows.images)):
        if len(np.unique(np.round(np.log(arr), 6))) < 3:
            raise FitError(f"degenerate grid: fewer than 3 distinct values of {name}, so its exponent cannot be "
                           f"identified; vary {'the model shape' if name == 'params' else 'the budget per shape'}")


def fit_parametric(rows: Rows, extra_starts: Sequence[np.ndarray] = (), starts: int = 6) -> dict[str, Any]:
    logs = np.stack([np.log(rows.params), np.log(rows.images)])
    fit = fit_sum_of_powers(logs, rows.metric, starts=starts, extra_starts=extra_starts)
    e, a, alpha, b, beta = fit.theta
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta,
            "converged": fit.converged, "theta": fit.theta}


def parametric_optimum(fit: dict[str, Any], flops_per_param_image: float, budget: float) -> float:
    """N minimising E + A/N^alpha + B/D^beta subject to C = c N D."""
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
    return g * (budget / flops_per_param_image) ** (beta / (alpha + beta))


def isoflop_profiles(rows: Rows) -> list[dict[str, Any]]:
    """Per budget with >= 3 distinct sizes: the parabola metric ~ q2 x^2 + q1 x + q0 in
    x = ln N and its minimum; a budget whose parabola opens downwards has no minimum."""
    out = []
    for label in np.unique(rows.budget):
        index = rows.budget == label
        x, y = np.log(rows.params[index]), rows.metric[index]
        if len(np.unique(np.round(x, 6))) < 3:
            continue
        q2, q1, q0 = np.polyfit(x, y, 2)
        flops = float(np.exp(np.mean(np.log(rows.flops[index]))))
        entry = {"budget": float(label), "flops": flops, "coeffs": [float(q2), float(q1), float(q0)],
                 "log_params": [float(v) for v in x], "metric": [float(v) for v in y]}
        if q2 > 0:
            x_opt = -q1 / (2 * q2)
            entry.update(n_opt=float(np.exp(x_opt)), extrapolated=bool(x_opt < x.min() or x_opt > x.max()))
        else:
            entry.update(n_opt=None, extrapolated=None)
        out.append(entry)
    return out


def fit_isoflop(rows: Rows) -> dict[str, Any]:
    profiles = isoflop_profiles(rows)
    usable = [p for p in profiles if p["n_opt"] is not None]
    if len(usable) < 2:
        raise FitError(f"IsoFLOP: {len(usable)} budget(s) with a minimum (of {len(profiles)} with >= 3 distinct "
                       "sizes): need at least 2 budgets, each with >= 3 model sizes around its optimum")
    log_c = np.log([p["flops"] for p in usable])
    log_n = np.log([p["n_opt"] for p in usable])
    slope, intercept = np.polyfit(log_c, log_n, 1)
    return {"exponent": float(slope), "log_k": float(intercept), "profiles": profiles}


def frontier_points(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    flops, best = [], []
    for label in np.unique(rows.budget):
        index = np.flatnonzero(rows.budget == label)
        i = index[np.argmin(rows.metric[index])]
        flops.append(rows.flops[i])
        best.append(rows.metric[i])
    return np.array(flops), np.array(best)


def fit_frontier(rows: Rows, extra_starts: Sequence[np.ndarray] = (), starts: int = 6) -> dict[str, Any]:
    c, y = frontier_points(rows)
    if len(c) < 3:
        raise FitError(f"frontier: {len(c)} budget(s); err(C) = E + A C^-alpha needs at least 3 budgets")
    fit = fit_sum_of_powers(np.log(c)[None], y, starts=starts, extra_starts=extra_starts)
    e, a, alpha = fit.theta
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "converged": fit.converged, "theta": fit.theta,
            "points": {"flops": c.tolist(), "metric": y.tolist()}}


# ----------------------------------------------------------------------------- everything + bootstrap


def _interval(samples: Sequence[float]) -> tuple[float | None, float | None]:
    values = np.array([v for v in samples if v is not None and np.isfinite(v)])
    if len(values) == 0:
        return None, None
    lo, hi = np.percentile(values, [50 * (1 - INTERVAL), 50 * (1 + INTERVAL)])
    return float(lo), float(hi)


VALUE_KEYS = ("alpha", "beta", "E", "A", "B", "parametric_exponent", "n_opt_parametric", "isoflop_exponent",
              "n_opt_isoflop", "frontier_E", "frontier_A", "frontier_alpha")


def _parametric_values(p: dict[str, Any], c_per: float, budget: float) -> dict[str, float]:
    return {"alpha": p["alpha"], "beta": p["beta"], "E": p["E"], "A": p["A"], "B": p["B"],
            "parametric_exponent": p["beta"] / (p["alpha"] + p["beta"]),
            "n_opt_parametric": parametric_optimum(p, c_per, budget)}


def _isoflop_values(s: dict[str, Any], budget: float) -> dict[str, float]:
    return {"isoflop_exponent": s["exponent"], "n_opt_isoflop": math.exp(s["log_k"]) * budget ** s["exponent"]}


def _frontier_values(f: dict[str, Any]) -> dict[str, float]:
    return {"frontier_E": f["E"], "frontier_A": f["A"], "frontier_alpha": f["alpha"]}


def _checked_parametric(rows: Rows, **kw) -> dict[str, Any]:
    check_parametric(rows)
    return fit_parametric(rows, **kw)


def fit_all(rows: Rows, *, bootstrap: int = 200, seed: int = 0, at_flops: float | None = None,
            metric: str = "knn_err", strict: bool = True) -> dict[str, Any]:
    """All three fits, their bootstrap intervals and the derived optima (JSON-ready).

    ``strict``: a fit the rows cannot support raises :class:`FitError`; otherwise its
    values are None and ``errors`` says why (a report still shows the others)."""
    c_per = float(np.median(rows.flops / (rows.params * rows.images)))
    budget = float(at_flops or rows.flops.max())
    fitters = {  # name: (fit of a sample given the full-data fit, the values it yields)
        "parametric": (lambda r, full: _checked_parametric(r, **_warm(full)),
                       lambda p: _parametric_values(p, c_per, budget)),
        "isoflop": (lambda r, full: fit_isoflop(r), lambda p: _isoflop_values(p, budget)),
        "frontier": (lambda r, full: fit_frontier(r, **_warm(full)), _frontier_values),
    }
    full, errors, point = {}, {}, {}
    for name, (fit, values) in fitters.items():
        try:
            full[name] = fit(rows, None)
        except FitError as exc:
            if strict:
                raise
            errors[name] = str(exc)
            continue
        point.update(values(full[name]))

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    iso_samples: list[tuple[float, float]] = []
    failed = {name: 0 for name in full}
    for _ in range(bootstrap):
        sample = rows.take(rng.integers(0, len(rows), len(rows)))
        for name, fitted in full.items():
            fit, values = fitters[name]
            try:
                refit = fit(sample, fitted)
            except FitError:
                refit = None
            if refit is None or not refit.get("converged", True):
                failed[name] += 1
                continue
            for key, value in values(refit).items():
                samples[key].append(value)
            if name == "isoflop":
                iso_samples.append((refit["log_k"], refit["exponent"]))

    result: dict[str, Any] = {"metric": metric, "rows": len(rows), "budgets": int(len(np.unique(rows.budget)))}
    for key in VALUE_KEYS:
        lo, hi = _interval(samples.get(key, []))
        value = point.get(key)
        result.update({key: None if value is None else float(value), f"{key}_lo": lo, f"{key}_hi": hi})
    result.update({
        "n_opt_budget_flops": budget, "flops_per_param_image": c_per,
        "isoflop_log_k": full["isoflop"]["log_k"] if "isoflop" in full else None,
        "interval": INTERVAL, "huber_delta": HUBER_DELTA,
        "bootstrap": {"samples": bootstrap, "seed": seed, "failed": failed},
        "converged": {name: bool(full[name]["converged"]) for name in ("parametric", "frontier") if name in full},
        "errors": errors,
        "at_bounds": {name: _at_bounds(full[name]["theta"], names) for name, names in
                      (("parametric", ("E", "A", "alpha", "B", "beta")), ("frontier", ("E", "A", "alpha")))
                      if name in full},
        "isoflop_profiles": full["isoflop"]["profiles"] if "isoflop" in full else isoflop_profiles(rows),
        "frontier_points": full["frontier"]["points"] if "frontier" in full else None,
        "isoflop_bootstrap": [list(s) for s in iso_samples],
        "holdout_largest_budget": holdout_check(rows),
    })
    return result


def _at_bounds(theta: np.ndarray, names: Sequence[str]) -> list[str]:
    """Parameters a fit left at a bound of its search box: not identified by the rows."""
    return [name for name, value, (lo, hi) in zip(names, theta, _bounds((len(theta) - 1) // 2))
            if min(value - lo, hi - value) < 1e-6 * max(1.0, abs(value))]


def _warm(full: dict[str, Any] | None) -> dict[str, Any]:
    """Bootstrap refits start from the full-data optimum only; full fits from the grid."""
    return {} if full is None else {"extra_starts": [full["theta"]], "starts": 0}


def holdout_check(rows: Rows) -> dict[str, Any]:
    """Fit the parametric law without the largest budget; predict that budget's runs."""
    largest = rows.budget.max()
    train, test = rows.take(rows.budget < largest), rows.take(rows.budget == largest)
    try:
        check_parametric(train)
    except FitError as exc:
        return {"skipped": str(exc)}
    par = fit_parametric(train)
    logs = np.stack([np.log(test.params), np.log(test.images)])
    pred = np.exp(_sum_of_powers(par["theta"], logs)[0])
    return {"budget": float(largest), "runs": len(test), "converged": par["converged"],
            "predicted": pred.tolist(), "measured": test.metric.tolist(),
            "mean_abs_rel_error": float(np.mean(np.abs(pred - test.metric) / test.metric))}


SUMMARY_KEYS = ("alpha", "beta", "E", "A", "B", "isoflop_exponent")


def contract_line(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON object ``fit`` prints last: every scalar and interval, no per-sample arrays."""
    return {k: v for k, v in result.items() if k not in ("isoflop_profiles", "isoflop_bootstrap", "frontier_points")}
