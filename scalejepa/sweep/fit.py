"""Scaling-law fits of a downstream error metric, with intervals that say what the rows determine.

* IsoFLOP (Hoffmann et al. 2022, approach 2): per compute budget, a parabola of the
  metric in log(params); its minimum is N_opt(C) when it lies inside the budget's sampled
  sizes (a vertex outside them is an extrapolation, not a measurement, and is left out);
  then N_opt = k C^a by least squares in log-log across budgets.
* Parametric (approach 3): ``err(N, D) = E + A / N^alpha + B / D^beta`` (N params, D
  images seen, repeats included: a warning says when runs went past 4 epochs), the Huber
  fit of ``powerlaw.py``. With C = c N D (c: the sweep's median
  FLOPs per parameter per image; I-JEPA's c is not 6, see ``scalejepa.flops``), the
  compute-optimal size is ``N_opt = G (C / c)^(beta / (alpha + beta))``,
  ``G = (alpha A / (beta B))^(1 / (alpha + beta))``.
* Frontier: ``err(C) = E + A C^-alpha`` through each budget's best run.
* Uncertainty, 80% intervals: the parametric and frontier laws by profile likelihood
  (``profile.py``: the row bootstrap under-covers where a term is small next to the noise,
  measured in ``benchmarks/results/fit_coverage_*.md``); the IsoFLOP exponent and N_opt by
  a bootstrap over rows (refits that fail are counted, never silently dropped). A profile
  that stays flat to the end of the search range leaves its interval open: the quantity is
  reported as not determined by the rows, in words, in ``undetermined``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalejepa.sweep import profile
from scalejepa.sweep.powerlaw import HUBER_DELTA, bounds, fit_sum_of_powers

INTERVAL = 0.8


class FitError(ValueError):
    """The rows cannot support the fit; the message says what is missing."""


@dataclass(frozen=True)
class Rows:
    params: np.ndarray  # N
    images: np.ndarray  # D
    flops: np.ndarray  # C
    metric: np.ndarray  # error in (0, inf)
    budget: np.ndarray  # group label per row (the planned budget, or clustered FLOPs)
    epochs: np.ndarray | None = None  # images seen / training-set size, where collect recorded it

    def take(self, index: np.ndarray) -> Rows:
        return Rows(self.params[index], self.images[index], self.flops[index], self.metric[index], self.budget[index],
                    None if self.epochs is None else self.epochs[index])

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
    epochs = np.array([float(r["epochs"]) for r in rows]) if all(r.get("epochs") for r in rows) else None
    return Rows(values["params"], values["images"], values["flops"], values[metric], budget, epochs)


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


def exp_or_none(x: float | None) -> float | None:
    """exp, or None where it would overflow (a value no row supports)."""
    return None if x is None or x > 700 else math.exp(x)


# ----------------------------------------------------------------------------- parametric law


def check_parametric(rows: Rows) -> None:
    if len(rows) < 8:
        raise FitError(f"{len(rows)} rows: the parametric law has 5 parameters; give at least 8 runs "
                       "(e.g. 3 budgets x 3 sizes)")
    for name, arr in (("params", rows.params), ("images", rows.images)):
        if len(np.unique(np.round(np.log(arr), 6))) < 3:
            raise FitError(f"degenerate grid: fewer than 3 distinct values of {name}, so its exponent cannot be "
                           f"identified; vary {'the model shape' if name == 'params' else 'the budget per shape'}")


@dataclass
class ParametricFit:
    """The Huber fit in centred coordinates (N over mean_n, D over mean_d, geometric means)."""

    theta: np.ndarray  # (e, a', alpha, b', beta); A = exp(a' + alpha log mean_n), B likewise
    loss: float
    converged: bool
    logs: np.ndarray  # (2, rows) centred log N, log D
    metric: np.ndarray
    log_mean: np.ndarray  # (log mean_n, log mean_d)
    flops_per_param_image: float

    @property
    def values(self) -> dict[str, float]:
        e, a, alpha, b, beta = self.theta
        return {"E": math.exp(e), "A": exp_or_none(a + alpha * self.log_mean[0]), "alpha": float(alpha),
                "B": exp_or_none(b + beta * self.log_mean[1]), "beta": float(beta)}

    def log_c(self, budget: float) -> float:
        """log C / (c mean_n mean_d): the budget in the centred coordinates of ``profile``."""
        return math.log(budget / self.flops_per_param_image) - float(self.log_mean.sum())

    def n_opt(self, budget: float) -> float | None:
        return exp_or_none(profile.log_n_opt(self.theta, self.log_c(budget)) + self.log_mean[0])

    def err_opt(self, budget: float) -> float | None:
        return exp_or_none(profile.log_err_opt(self.theta, self.log_c(budget)))


def fit_parametric(rows: Rows) -> ParametricFit:
    check_parametric(rows)
    raw = np.stack([np.log(rows.params), np.log(rows.images)])
    log_mean = raw.mean(1)
    logs = raw - log_mean[:, None]
    fit = fit_sum_of_powers(logs, rows.metric)
    if not np.all(np.isfinite(fit.theta)):
        raise FitError("the parametric fit failed from every start (the loss was not finite): check the rows")
    c_per = float(np.median(rows.flops / (rows.params * rows.images)))
    return ParametricFit(fit.theta, fit.loss, fit.converged, logs, rows.metric, log_mean, c_per)


def parametric_intervals(fit: ParametricFit, budget: float, level: float = INTERVAL) -> dict[str, dict[str, Any]]:
    """Profile-likelihood intervals of the law's parameters, its compute-optimal exponent and
    N_opt at ``budget``: {key: {"lo", "hi", "open": [...]}} in the reported units."""
    prof = profile.Profile(fit.logs, fit.metric, fit.theta, fit.loss, level)
    m_n, m_d = fit.log_mean
    quantities = {  # key: (quantity in theta, its value -> the reported value)
        "E": (profile.coordinate(0, "e", 2), math.exp),
        "A": (profile.linear("log A", [0, 1, m_n, 0, 0], 1), exp_or_none),
        "alpha": (profile.coordinate(2, "alpha", 2), float),
        "B": (profile.linear("log B", [0, 0, 0, 1, m_d], 3), exp_or_none),
        "beta": (profile.coordinate(4, "beta", 2), float),
        "parametric_exponent": (profile.exponent_quantity(), float),
        "n_opt_parametric": (profile.n_opt_quantity(fit.log_c(budget)), lambda v: exp_or_none(v + m_n)),
    }
    bands = {key: _reported(prof.interval(q), to) for key, (q, to) in quantities.items()}
    for key, names in edge_parameters(fit.theta).items():
        bands[key]["at_edge"] = names
    return bands


# Which reported quantities a parameter of theta = (e, a', alpha, b', beta) moves.
_DEPENDENTS = (("E",), ("A", "alpha", "parametric_exponent", "n_opt_parametric"),
               ("A", "alpha", "parametric_exponent", "n_opt_parametric"),
               ("B", "beta", "parametric_exponent", "n_opt_parametric"),
               ("B", "beta", "parametric_exponent", "n_opt_parametric"))
_THETA_NAMES = ("E", "A", "alpha", "B", "beta")


def edge_parameters(theta: np.ndarray) -> dict[str, list[str]]:
    """{reported key: the parameters at the edge of the search box that it depends on}.

    A best fit at the box's edge (a term pushed to vanish, or to an extreme exponent that
    follows the noise of a few runs) is where the profile's likelihood-ratio calibration
    fails: the coverage simulation found such intervals excluding the truth in most draws."""
    out: dict[str, list[str]] = {}
    for value, (lo, hi), name, keys in zip(theta, bounds(2), _THETA_NAMES, _DEPENDENTS):
        if min(value - lo, hi - value) < 1e-6 * max(1.0, abs(value)):
            for key in keys:
                out.setdefault(key, []).append(name)
    return out


def _reported(interval: profile.Interval, to) -> dict[str, Any]:
    return {"lo": to(interval.lo), "hi": to(interval.hi),
            "open": [end for end, is_open in (("lo", interval.lo_open), ("hi", interval.hi_open)) if is_open]}


# ----------------------------------------------------------------------------- IsoFLOP


def isoflop_profiles(rows: Rows) -> list[dict[str, Any]]:
    """Per budget with >= 3 distinct sizes: the parabola metric ~ q2 x^2 + q1 x + q0 in
    x = ln N and its minimum, if it has one inside the sampled sizes."""
    out = []
    for label in np.unique(rows.budget):
        index = rows.budget == label
        x, y = np.log(rows.params[index]), rows.metric[index]
        if len(np.unique(np.round(x, 6))) < 3:
            continue
        q2, q1, q0 = np.polyfit(x, y, 2)
        flops = float(np.exp(np.mean(np.log(rows.flops[index]))))
        entry = {"budget": float(label), "flops": flops, "coeffs": [float(q2), float(q1), float(q0)],
                 "log_params": [float(v) for v in x], "metric": [float(v) for v in y], "n_opt": None}
        if q2 * np.ptp(x) ** 2 <= 1e-9 * np.abs(y).max():  # flat to rounding: the sign of q2 means nothing
            entry["no_minimum"] = "the profile is flat or the parabola opens downwards"
        elif not x.min() <= -q1 / (2 * q2) <= x.max():
            entry["no_minimum"] = "its vertex lies outside the sampled sizes"
        else:
            entry["n_opt"] = float(np.exp(-q1 / (2 * q2)))
        out.append(entry)
    return out


def fit_isoflop(rows: Rows) -> dict[str, Any]:
    profiles = isoflop_profiles(rows)
    usable = [p for p in profiles if p["n_opt"] is not None]
    if len(usable) < 2:
        raise FitError(f"IsoFLOP: {len(usable)} budget(s) with a minimum inside their sampled sizes (of "
                       f"{len(profiles)} with >= 3 distinct sizes): N_opt(C) is not determined; give at least 2 "
                       "budgets, each with >= 3 model sizes on both sides of its optimum")
    log_c = np.log([p["flops"] for p in usable])
    if np.ptp(log_c) == 0:
        raise FitError("IsoFLOP: every budget with a minimum has the same FLOPs: N_opt(C)'s exponent is not determined")
    log_n = np.log([p["n_opt"] for p in usable])
    slope, intercept = np.polyfit(log_c, log_n, 1)
    return {"exponent": float(slope), "log_k": float(intercept), "profiles": profiles}


def _isoflop_values(fit: dict[str, Any], budget: float) -> dict[str, float | None]:
    return {"isoflop_exponent": fit["exponent"], "n_opt_isoflop": exp_or_none(fit["log_k"] + fit["exponent"] * math.log(budget))}


def isoflop_bootstrap(rows: Rows, budget: float, samples: int, seed: int) -> tuple[dict[str, list[float]], int, list]:
    """Refits on rows resampled with replacement: values per key, failed refits, (log_k, exponent) pairs."""
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {"isoflop_exponent": [], "n_opt_isoflop": []}
    pairs, failed = [], 0
    for _ in range(samples):
        try:
            refit = fit_isoflop(rows.take(rng.integers(0, len(rows), len(rows))))
        except FitError:
            failed += 1
            continue
        for key, value in _isoflop_values(refit, budget).items():
            if value is not None:
                values[key].append(value)
        pairs.append([refit["log_k"], refit["exponent"]])
    return values, failed, pairs


def _percentiles(samples: Sequence[float]) -> dict[str, Any]:
    values = np.array([v for v in samples if np.isfinite(v)])
    if len(values) == 0:
        return {"lo": None, "hi": None, "open": []}
    lo, hi = np.percentile(values, [50 * (1 - INTERVAL), 50 * (1 + INTERVAL)])
    return {"lo": float(lo), "hi": float(hi), "open": []}


# ----------------------------------------------------------------------------- frontier


def frontier_points(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    flops, best = [], []
    for label in np.unique(rows.budget):
        index = np.flatnonzero(rows.budget == label)
        i = index[np.argmin(rows.metric[index])]
        flops.append(rows.flops[i])
        best.append(rows.metric[i])
    return np.array(flops), np.array(best)


def fit_frontier(rows: Rows) -> dict[str, Any]:
    """err(C) = E + A C^-alpha through each budget's best run, with profile intervals when
    there are more budgets than its 3 parameters."""
    c, y = frontier_points(rows)
    if len(c) < 3:
        raise FitError(f"frontier: {len(c)} budget(s); err(C) = E + A C^-alpha needs at least 3 budgets")
    log_c = np.log(c)
    mean = float(log_c.mean())
    logs = (log_c - mean)[None]
    fit = fit_sum_of_powers(logs, y)
    if not np.all(np.isfinite(fit.theta)):
        raise FitError("the frontier fit failed from every start (the loss was not finite)")
    e, a, alpha = fit.theta
    out = {"E": math.exp(e), "A": exp_or_none(a + alpha * mean), "alpha": float(alpha), "converged": fit.converged,
           "points": {"flops": c.tolist(), "metric": y.tolist()}, "intervals": {}}
    if len(c) > 3:
        prof = profile.Profile(logs, y, fit.theta, fit.loss, INTERVAL)
        for key, q, to in (("E", profile.coordinate(0, "e", 1), math.exp),
                           ("A", profile.linear("log A", [0, 1, mean], 1), exp_or_none),
                           ("alpha", profile.coordinate(2, "alpha", 1), float)):
            out["intervals"][key] = _reported(prof.interval(q), to)
    return out


# ----------------------------------------------------------------------------- everything

VALUE_KEYS = ("alpha", "beta", "E", "A", "B", "parametric_exponent", "n_opt_parametric", "isoflop_exponent",
              "n_opt_isoflop", "frontier_E", "frontier_A", "frontier_alpha")

# What each quantity means, for the sentences that say a quantity is not determined.
MEANING = {
    "alpha": "alpha (how fast the error falls as the model grows)",
    "beta": "beta (how fast the error falls with more images seen)",
    "E": "E (the error that no model size or amount of data removes)",
    "A": "A (the size of the model-size term)",
    "B": "B (the size of the data term)",
    "parametric_exponent": "the compute-optimal exponent beta / (alpha + beta) (how fast the best model size "
                           "grows with compute)",
    "n_opt_parametric": "the compute-optimal model size N_opt from the parametric law",
    "frontier_E": "the frontier's floor E (the error more compute would approach)",
    "frontier_A": "the frontier's scale A",
    "frontier_alpha": "the frontier's exponent (how fast the best error falls with compute)",
    "isoflop_exponent": "the IsoFLOP exponent a of N_opt = k C^a",
    "n_opt_isoflop": "the compute-optimal model size N_opt from the IsoFLOP fit",
}
_SIZES = ("the runs vary model size too little, or the model-size term is small next to the run-to-run noise: add "
          "model sizes (wider apart) or seeds")
_DATA = ("the runs vary the images seen per model too little, or the data term is small next to the noise: add "
         "budgets (wider apart)")
_BUDGETS = "too few budgets, or budgets too close together: add budgets (wider apart)"
HINT = {
    "alpha": _SIZES, "A": _SIZES, "beta": _DATA, "B": _DATA,
    "E": "E trades off against the slower of the two terms: budgets further apart, or larger ones, pin it down",
    "parametric_exponent": f"{_SIZES}; or {_DATA}", "n_opt_parametric": f"{_SIZES}; or {_DATA}",
    "isoflop_exponent": "too few budgets with a minimum inside their sizes: add sizes around each budget's optimum",
    "n_opt_isoflop": "too few budgets with a minimum inside their sizes: add sizes around each budget's optimum",
    "frontier_E": _BUDGETS, "frontier_A": _BUDGETS, "frontier_alpha": _BUDGETS,
}


# A positive quantity whose interval spans more than this factor is reported as not
# determined even when the profile closes inside the search range (alpha in [0.003, 4.6]).
# Amplitudes (A, B, frontier A) are exempt: at N = 1 they are extrapolations whose
# intervals are wide by nature; only an open interval flags them.
WIDE_FACTOR = 10.0
# Runs past this many epochs get a warning: D (images seen) then counts repeats.
REPEAT_EPOCHS = 4
# IsoFLOP profiles over sizes further apart than this get a warning (the parabola's bias).
ISOFLOP_SPAN = 30.0
AMPLITUDES = ("A", "B", "frontier_A")


def undetermined_text(key: str, value: float | None, band: dict[str, Any]) -> str | None:
    """A sentence for a newcomer when ``band`` says the rows do not determine ``key``; else None."""
    lo, hi, ends, edge = band["lo"], band["hi"], band["open"], band.get("at_edge")
    wide = (key not in AMPLITUDES and lo is not None and lo > 0 and (hi is None or hi > WIDE_FACTOR * lo))
    if not ends and not wide and not edge:
        return None
    why = (f"its 80% interval stays open to the end of the search range ({' and '.join(ends)})" if ends else
           f"its 80% interval spans more than a factor of {WIDE_FACTOR:g}" if wide else
           f"the best fit puts {' and '.join(edge)} at the edge of the search range (a term pushed to vanish, or to "
           "an extreme exponent that follows the noise of a few runs), where its interval cannot be trusted")
    hint = HINT[key]
    span = (f"every value from {_num(lo)} to {_num(hi)} fits them about as well as the best fit ({_num(value)})"
            if not edge or ends or wide else f"the best fit is {_num(value)}, its interval [{_num(lo)}, {_num(hi)}]")
    return (f"{MEANING.get(key, key)} is not determined by these runs: {span}; {why}, so its number means little. "
            f"Likely cause: {hint}.")


def _num(value: float | None) -> str:
    if value is None:
        return "inf"
    return "0" if value < 1e-8 else f"{value:.3g}"


def fit_all(rows: Rows, *, bootstrap: int = 200, seed: int = 0, at_flops: float | None = None,
            metric: str = "knn_err", strict: bool = True) -> dict[str, Any]:
    """All three fits, their intervals and the derived optima (JSON-ready).

    ``strict``: a fit the rows cannot support raises :class:`FitError`; otherwise its
    values are None and ``errors`` says why (a report still shows the others)."""
    budget = float(at_flops or rows.flops.max())
    c_per = float(np.median(rows.flops / (rows.params * rows.images)))
    point: dict[str, float | None] = {}
    intervals: dict[str, dict[str, Any]] = {}
    method: dict[str, str] = {}
    errors: dict[str, str] = {}
    converged: dict[str, bool] = {}
    iso: dict[str, Any] | None = None
    frontier: dict[str, Any] | None = None
    iso_samples: list = []
    failed = 0

    def attempt(name: str, fit):
        try:
            return fit()
        except FitError as exc:
            if strict:
                raise
            errors[name] = str(exc)
            return None

    par = attempt("parametric", lambda: fit_parametric(rows))
    if par is not None:
        point.update(par.values, parametric_exponent=float(par.theta[4] / (par.theta[2] + par.theta[4])),
                     n_opt_parametric=par.n_opt(budget))
        intervals.update(parametric_intervals(par, budget))
        method.update(dict.fromkeys(intervals, "profile likelihood"))
        converged["parametric"] = par.converged
    iso = attempt("isoflop", lambda: fit_isoflop(rows))
    if iso is not None:
        point.update(_isoflop_values(iso, budget))
        samples, failed, iso_samples = isoflop_bootstrap(rows, budget, bootstrap, seed)
        for key, values in samples.items():
            intervals[key] = _percentiles(values)
            method[key] = "row bootstrap"
    frontier = attempt("frontier", lambda: fit_frontier(rows))
    if frontier is not None:
        converged["frontier"] = frontier["converged"]
        for key in ("E", "A", "alpha"):
            point[f"frontier_{key}"] = frontier[key]
            if key in frontier["intervals"]:
                intervals[f"frontier_{key}"] = frontier["intervals"][key]
                method[f"frontier_{key}"] = "profile likelihood"

    result: dict[str, Any] = {"metric": metric, "rows": len(rows), "budgets": int(len(np.unique(rows.budget)))}
    undetermined, warnings = {}, []
    for key in VALUE_KEYS:
        band = intervals.get(key, {"lo": None, "hi": None, "open": []})
        result.update({key: point.get(key), f"{key}_lo": band["lo"], f"{key}_hi": band["hi"]})
        text = undetermined_text(key, point.get(key), band)
        if text:
            undetermined[key] = text
    if bootstrap and iso is not None and failed > bootstrap / 2:
        warnings.append(f"{failed} of {bootstrap} IsoFLOP refits on resampled runs failed: its interval comes from the "
                        "few resamples that could be fitted and understates the uncertainty")
    spans = [math.exp(np.ptp(p["log_params"])) for p in (iso or {}).get("profiles", []) if p["n_opt"] is not None]
    if spans and max(spans) > ISOFLOP_SPAN:
        warnings.append(f"the IsoFLOP parabolas span model sizes up to {max(spans):.0f}x apart: over more than "
                        f"~{ISOFLOP_SPAN:g}x a parabola in log N is a poor description and its minimum is biased, which "
                        "the bootstrap interval does not include (fit_coverage measured 22% coverage over 3,000x); "
                        "prefer the parametric N_opt, or sample sizes closer to each budget's optimum")
    if rows.epochs is not None and rows.epochs.max() > REPEAT_EPOCHS:
        warnings.append(f"{int(np.sum(rows.epochs > REPEAT_EPOCHS))} of {len(rows)} runs saw their training set more "
                        f"than {REPEAT_EPOCHS} times (up to {rows.epochs.max():.0f}): the law's D counts images seen, "
                        "repeats included, and repeats beyond ~4 epochs are worth less than new images (Muennighoff "
                        "et al. 2023), which bends the data term")
    if frontier is not None and not frontier["intervals"]:
        warnings.append("3 budgets for the frontier's 3 parameters: it passes through their best runs exactly, so it "
                        "has no interval; add a budget")
    for name, ok in converged.items():
        if not ok:
            warnings.append(f"the {name} fit did not converge (L-BFGS-B stopped early): treat its numbers with care")
    result.update({
        "n_opt_budget_flops": budget, "flops_per_param_image": c_per, "fitted_D": "images seen (the rows' images)",
        "isoflop_log_k": iso["log_k"] if iso else None,
        "interval": INTERVAL, "huber_delta": HUBER_DELTA,
        "interval_method": method,
        "open_intervals": {key: band["open"] for key, band in intervals.items() if band["open"]},
        "undetermined": undetermined, "warnings": warnings,
        "bootstrap": {"samples": bootstrap, "seed": seed, "failed": {"isoflop": failed}},
        "converged": converged, "errors": errors,
        "isoflop_profiles": iso["profiles"] if iso else isoflop_profiles(rows),
        "frontier_points": frontier["points"] if frontier else None,
        "isoflop_bootstrap": iso_samples,
    })
    return result


def contract_line(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON object ``fit`` prints last: every scalar and interval, no per-sample arrays."""
    return {k: v for k, v in result.items() if k not in ("isoflop_profiles", "isoflop_bootstrap", "frontier_points")}
