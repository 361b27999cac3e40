"""``report``: PNG plots and a Markdown summary of a fitted sweep (``DIR/report/``).

* ``frontier.png``: metric vs compute (log-log), every run, the fitted frontier;
* ``isoflop.png``: metric vs params per budget, each parabola and its minimum;
* ``n_opt.png``: N_opt(C) from the IsoFLOP minima, the fitted power law and its 80% band.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from scalejepa.io import atomic_write, atomic_write_text
from scalejepa.layout import SweepDir
from scalejepa.sweep.collect import read_rows


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def write_report(sweep: SweepDir, fit: dict[str, Any], metric: str, forecast: dict[str, Any] | None = None) -> Path:
    import matplotlib  # ~0.5 s and a backend choice: only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = sweep.report
    rows = read_rows(sweep.rows)
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: min(r["params"] for r in rows if r["shape"] == s))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(shapes))))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for shape, color in zip(shapes, colors):
        mine = [r for r in rows if r["shape"] == shape]
        ax.scatter([r["flops"] for r in mine], [r[metric] for r in mine], color=color, label=shape, s=28)
    if fit["frontier_alpha"] is not None:
        c = np.geomspace(min(r["flops"] for r in rows) / 1.5, max(r["flops"] for r in rows) * 3, 100)
        ax.plot(c, fit["frontier_E"] + fit["frontier_A"] * c ** (-fit["frontier_alpha"]), "k--",
                label=f"frontier E + A C^-{fit['frontier_alpha']:.2f}")
        ax.axhline(fit["frontier_E"], color="0.6", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (scalejepa.flops model)", ylabel=metric,
           title="error vs compute")
    ax.legend(fontsize=7)
    _save(fig, out / "frontier.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    budgets = fit["isoflop_profiles"]
    for profile, color in zip(budgets, plt.cm.plasma(np.linspace(0, 0.85, max(1, len(budgets))))):
        x = np.array(profile["log_params"])
        ax.scatter(np.exp(x), profile["metric"], color=color, s=28, label=f"C = {profile['flops']:.2g}")
        grid = np.linspace(x.min() - 0.3, x.max() + 0.3, 100)
        ax.plot(np.exp(grid), np.polyval(profile["coeffs"], grid), color=color, lw=1)
        if profile["n_opt"] is not None:
            ax.scatter([profile["n_opt"]], [np.polyval(profile["coeffs"], math.log(profile["n_opt"]))], marker="*",
                       s=140, color=color, edgecolor="k", zorder=3)
    ax.set(xscale="log", xlabel="encoder parameters", ylabel=metric, title="IsoFLOP profiles (* = parabola minimum)")
    ax.legend(fontsize=7)
    _save(fig, out / "isoflop.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    found = [p for p in budgets if p["n_opt"] is not None]
    ax.scatter([p["flops"] for p in found], [p["n_opt"] for p in found], color="k", zorder=3, label="IsoFLOP minima")
    c = np.geomspace(min(r["flops"] for r in rows) / 2, max(r["flops"] for r in rows) * 4, 60)
    if fit["isoflop_exponent"] is not None:
        ax.plot(c, np.exp(fit["isoflop_log_k"]) * c ** fit["isoflop_exponent"], "k-",
                label=f"N_opt = k C^{fit['isoflop_exponent']:.2f}")
    samples = np.array(fit["isoflop_bootstrap"])
    if len(samples) and fit["isoflop_exponent"] is not None:
        curves = np.exp(samples[:, :1] + samples[:, 1:2] * np.log(c)[None])
        lo, hi = np.percentile(curves, [10, 90], axis=0)
        ax.fill_between(c, lo, hi, color="0.7", alpha=0.5, label="80% bootstrap band")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="compute-optimal encoder parameters",
           title="N_opt(C)")
    ax.legend(fontsize=7)
    _save(fig, out / "n_opt.png")
    plt.close(fig)

    atomic_write_text(out / "summary.md",
                      summary_markdown(rows, fit, metric, forecast or {"skipped": "no forecast was given"}))
    return out


def _band(fit: dict[str, Any], key: str, fmt: str = ".3g") -> str:
    if fit[key] is None:
        return "not fitted (see below)"
    lo, hi = fit[f"{key}_lo"], fit[f"{key}_hi"]
    band = (f" [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None and hi is not None else " (no interval)")
    return f"{fit[key]:{fmt}}{band}" + (" **not determined**" if key in fit["undetermined"] else "")


def _forecast_lines(f: dict[str, Any]) -> list[str]:
    if "skipped" in f:
        return [f"Forecast of the largest budget: skipped ({f['skipped']})."]
    when = ("made before its runs existed" if f["made_before_measurement"] else
            "made after its runs existed, from the smaller budgets' runs only")
    lines = [f"## Forecast of the largest budget ({f['budget_flops']:.3g} FLOPs), {when}", "",
             f"Fitted on {f['fit_rows']} runs of {len(f['fit_budgets'])} smaller budgets; 80% profile-likelihood "
             "intervals.", "", "| | predicted [80%] | measured |", "|---|---|---|",
             f"| best error | {f['predicted_err']:.4g} [{f['predicted_err_lo']:.4g}, {f['predicted_err_hi']:.4g}] | "
             + ("not yet" if f["measured_err"] is None else f"{f['measured_err']:.4g}") + " |",
             f"| N_opt | {f['predicted_n_opt']:.3g} [{f['predicted_n_opt_lo']:.3g}, "
             + ("inf" if f["predicted_n_opt_hi"] is None else f"{f['predicted_n_opt_hi']:.3g}") + "] | "
             + ("not yet" if f["measured_n_opt"] is None else f"{f['measured_n_opt']:.3g}") + " |", "",
             f"Counts (best error within {100 * f['err_tolerance']:.0f}% and N_opt inside the interval): "
             f"**{f['counts']}**: {f['why']}."]
    return lines + [f"Warning: {text}." for text in f["undetermined"].values()]


def summary_markdown(rows: list[dict[str, Any]], fit: dict[str, Any], metric: str, forecast: dict[str, Any]) -> str:
    failed = fit["bootstrap"]["failed"]["isoflop"]
    lines = [
        f"# Sweep report: {metric}",
        "",
        f"{fit['rows']} runs, {fit['budgets']} budgets; 80% intervals: the parametric law and the frontier by profile "
        f"likelihood, the IsoFLOP fit by a bootstrap over runs ({fit['bootstrap']['samples']} resamples, {failed} "
        "failed refits). A quantity marked **not determined** has an interval that reaches the end of the search "
        "range or spans more than a factor of 10: the runs do not pin it down (see the warnings below).",
        "",
        "| quantity | fit [80% interval] |",
        "|---|---|",
        f"| IsoFLOP exponent a (N_opt = k C^a) | {_band(fit, 'isoflop_exponent')} |",
        f"| parametric alpha (params) | {_band(fit, 'alpha')} |",
        f"| parametric beta (images) | {_band(fit, 'beta')} |",
        f"| parametric E / A / B | {_band(fit, 'E')} / {_band(fit, 'A')} / {_band(fit, 'B')} |",
        f"| parametric exponent beta/(alpha+beta) | {_band(fit, 'parametric_exponent')} |",
        f"| frontier err(C) = E + A C^-alpha: alpha | {_band(fit, 'frontier_alpha')} |",
        f"| frontier E (irreducible error) | {_band(fit, 'frontier_E')} |",
        f"| N_opt at {fit['n_opt_budget_flops']:.3g} FLOPs, IsoFLOP | {_band(fit, 'n_opt_isoflop', '.3g')} |",
        f"| N_opt at {fit['n_opt_budget_flops']:.3g} FLOPs, parametric | {_band(fit, 'n_opt_parametric', '.3g')} |",
        "",
        f"FLOPs per parameter per image (median over runs, the parametric law's C = c N D): "
        f"{fit['flops_per_param_image']:.3g}. Params are encoder parameters; FLOPs the analytic training model.",
        "",
        "IsoFLOP minima: " + "; ".join(
            f"C = {p['flops']:.2g}: " + (f"N_opt = {p['n_opt']:.3g}" if p["n_opt"] is not None
                                         else f"no minimum ({p['no_minimum']})")
            for p in fit["isoflop_profiles"]) + ".",
        "",
    ]
    for name, message in fit["errors"].items():
        lines += [f"The {name} fit failed: {message}", ""]
    for text in [*fit["undetermined"].values(), *fit["warnings"]]:
        lines += [f"Warning: {text}", ""]
    lines += _forecast_lines(forecast)
    lines += ["", "| run | params | images seen | epochs | FLOPs | " + metric + " | train loss (not comparable across "
              "sizes) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["flops"], r["params"])):
        epochs = "?" if r.get("epochs") is None else f"{r['epochs']:.1f}"
        lines.append(f"| {r['run']} | {r['params']:,} | {r['images']:,} | {epochs} | {r['flops']:.3g} | {r[metric]:.4f} | "
                     f"{r['final_train_loss']:.4f} |")
    lines += ["", "Plots: ![frontier](frontier.png) ![isoflop](isoflop.png) ![n_opt](n_opt.png)", ""]
    return "\n".join(lines)
