"""``scalejepa-sweep``: plan, run, collect, fit and report a scaling-law sweep.

    scalejepa-sweep plan cpu_demo --out sweeps/demo      # table of runs, sweeps/demo/plan.json
    scalejepa-sweep run sweeps/demo --parallel 2         # local subprocesses; re-run resumes
    scalejepa-sweep run sweeps/demo --launcher slurm     # sbatch --array, one task per job
    scalejepa-sweep collect sweeps/demo                  # sweeps/demo/runs.jsonl
    scalejepa-sweep fit sweeps/demo                      # or: fit --runs FILE.jsonl --metric knn_err
    scalejepa-sweep report sweeps/demo                   # sweeps/demo/report/*.png + summary.md

Forecast first: run every budget but the largest, forecast it, then run it and compare:

    scalejepa-sweep run sweeps/law --parallel 2 --hold-out-largest
    scalejepa-sweep collect sweeps/law
    scalejepa-sweep forecast sweeps/law                  # sweeps/law/forecast.json, measured_* null
    scalejepa-sweep run sweeps/law --parallel 2          # the held-out budget
    scalejepa-sweep collect sweeps/law
    scalejepa-sweep forecast sweeps/law                  # adds the measurement and the verdict

``fit`` and ``forecast`` print a JSON object as their last stdout line: for ``fit``,
alpha, beta, E, A, B and isoflop_exponent, each with _lo/_hi (80% interval), and more;
quantities the runs do not determine are named, in words, in ``undetermined``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from scalejepa.io import atomic_write_json
from scalejepa.layout import FORECAST_FILE, SweepDir
from scalejepa.sweep import forecast as fc
from scalejepa.sweep import runner
from scalejepa.sweep.collect import CollectError, collect, read_rows
from scalejepa.sweep.fit import FitError, contract_line, fit_all, rows_from_dicts
from scalejepa.sweep.plan import check_probe_data, format_table, plan_sweep
from scalejepa.sweep.records import load_plan, save_plan
from scalejepa.sweep.report import write_report
from scalejepa.sweep.runner import SweepRunError
from scalejepa.sweep.spec import SweepSpecError, load_spec, spec_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalejepa-sweep", description="Compute-optimal I-JEPA sweeps.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="expand a spec into runs, write DIR/plan.json")
    plan.add_argument("spec", help="shipped spec name (cpu_demo) or a YAML path")
    plan.add_argument("--out", required=True, type=Path, help="the sweep directory")
    run = sub.add_parser("run", help="train and probe the planned runs (finished ones are skipped)")
    run.add_argument("dir", type=Path)
    run.add_argument("--launcher", choices=("local", "slurm"), default="local")
    run.add_argument("--parallel", type=int, default=1, help="local: jobs at a time")
    run.add_argument("--no-submit", action="store_true", help="slurm: write the script, do not call sbatch")
    run.add_argument("--hold-out-largest", action="store_true",
                     help="leave the largest budget's runs for later (forecast them first); a later run without "
                          "this flag trains them, resuming each shape's long run")
    collect = sub.add_parser("collect", help="one row per finished run: DIR/runs.jsonl")
    collect.add_argument("dir", type=Path)
    fit = sub.add_parser("fit", help="IsoFLOP, parametric and frontier fits with bootstrap intervals")
    fit.add_argument("dir", type=Path, nargs="?", help="sweep directory (its runs.jsonl); or give --runs")
    fit.add_argument("--runs", type=Path, help="a JSONL file of rows with params, flops, images and the metric")
    _fit_options(fit)
    forecast = sub.add_parser("forecast", help="fit every budget but the largest, forecast it: DIR/forecast.json; "
                                               "again once it ran: adds the measurement")
    forecast.add_argument("dir", type=Path, nargs="?", help="sweep directory (plan.json, runs.jsonl); or give --runs")
    forecast.add_argument("--runs", type=Path, help="a JSONL file of rows with budget, params, flops, images, metric "
                                                    "(the largest budget in it is held out)")
    forecast.add_argument("--out", type=Path, help="default: DIR/forecast.json (with --runs: next to the file)")
    forecast.add_argument("--metric", default="knn_err", help="the error column to forecast (knn_err, linear_err)")
    forecast.add_argument("--refit", action="store_true", help="discard an existing forecast and fit again")
    report = sub.add_parser("report", help="plots (PNG) and a Markdown summary in DIR/report/")
    report.add_argument("dir", type=Path)
    _fit_options(report)
    worker = sub.add_parser("worker", help="(internal) run one job of a plan")
    worker.add_argument("dir", type=Path)
    worker.add_argument("--job", type=int, required=True)
    worker.add_argument("--launcher", choices=("local", "slurm"), default="local")
    worker.add_argument("--hold-out-largest", action="store_true")
    return parser


def _fit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metric", default="knn_err", help="the error column to fit (knn_err, linear_err)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at-flops", type=float, default=None,
                        help="budget for N_opt and its interval (default: the largest in the rows)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _dispatch(args)
    except (SweepSpecError, SweepRunError, CollectError, FitError) as exc:
        print(f"scalejepa-sweep {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    folder = args.out if args.command == "plan" else args.dir  # fit and forecast may take --runs instead
    sweep = SweepDir(folder) if folder else None
    if args.command == "plan":
        plan = plan_sweep(load_spec(args.spec), str(spec_path(args.spec)))
        print(format_table(plan))
        print(f"plan: {save_plan(plan, sweep)}")
        return 0
    if args.command == "run":
        check_probe_data(load_plan(sweep).spec)
        if args.launcher == "slurm":
            print(f"slurm script: {runner.run_slurm(sweep, submit=not args.no_submit, hold_out_largest=args.hold_out_largest)}")
            return 0
        if args.parallel < 1:
            raise SweepRunError("--parallel must be >= 1")
        failed = runner.run_local(sweep, args.parallel, hold_out_largest=args.hold_out_largest)
        return 1 if failed else 0
    if args.command == "worker":
        runner.run_job(sweep, args.job, args.launcher, hold_out_largest=args.hold_out_largest)
        return 0
    if args.command == "collect":
        path, count, missing = collect(sweep)
        print(f"collect: {count} finished runs -> {path}" + (f"; not finished: {', '.join(missing)}" if missing else ""))
        return 0
    if args.command == "fit":
        # Fits the rows cannot support are named (errors, undetermined); only if none can be made is it an error.
        result = _fit(args, args.runs if args.runs else _sweep_given(sweep).rows, strict=False)
        if len(result["errors"]) == 3:  # parametric, isoflop and frontier
            raise FitError("; ".join(f"{name}: {message}" for name, message in result["errors"].items()))
        if sweep:
            atomic_write_json(sweep.fit, result)
        print(_fit_text(result))
        print(json.dumps(contract_line(result)))
        return 0
    if args.command == "forecast":
        result = _forecast(args, sweep)
        print(fc.summary_text(result))
        print(json.dumps({k: v for k, v in result.items() if k not in ("fit_runs", "measured_vs_law")}))
        return 0
    if args.command == "report":
        result = _fit(args, _sweep_given(sweep).rows, strict=False)
        atomic_write_json(sweep.fit, result)
        for name, message in result["errors"].items():
            print(f"report: the {name} fit failed: {message}", file=sys.stderr)
        print(f"report: {write_report(sweep, result, args.metric, _report_forecast(args, sweep))}")
        return 0
    raise AssertionError(args.command)


def _sweep_given(sweep: SweepDir | None) -> SweepDir:
    if sweep is None:
        raise FitError("give a sweep directory or --runs FILE.jsonl")
    return sweep


def _fit(args: argparse.Namespace, path: Path, strict: bool) -> dict:
    rows = rows_from_dicts(read_rows(path), args.metric)
    return fit_all(rows, bootstrap=args.bootstrap, seed=args.seed, at_flops=args.at_flops, metric=args.metric,
                   strict=strict)


def _forecast(args: argparse.Namespace, sweep: SweepDir | None) -> dict:
    """A new forecast, or the existing one with the held-out runs' measurement added."""
    if args.runs:
        rows = read_rows(args.runs)
        out = args.out or args.runs.parent / FORECAST_FILE
        held_out = max(float(r["budget"]) for r in rows if r.get("budget") is not None) if rows else None
        if held_out is None:
            raise FitError(f"{args.runs}: no row has a budget: a forecast holds out the largest budget")
        budget_flops = _geomean([float(r["flops"]) for r in rows if float(r["budget"]) == held_out])
    else:
        plan = load_plan(_sweep_given(sweep))
        held_out = plan.largest_budget
        budget_flops = _geomean([r.flops_est for r in plan.runs if r.budget == held_out])
        rows = read_rows(sweep.rows)
        out = args.out or sweep.forecast
    if out.is_file() and not args.refit:
        existing = json.loads(out.read_text())
        if existing.get("format") != fc.FORMAT or existing["metric"] != args.metric or existing["budget"] != held_out:
            raise FitError(f"{out} holds another forecast ({existing.get('metric')} at budget {existing.get('budget')}): "
                           "give --out for a new one, or --refit to replace it")
        result = fc.add_measurement(existing, rows)
    else:
        result = fc.forecast_rows(rows, args.metric, held_out, budget_flops)
    atomic_write_json(out, result)
    print(f"forecast: {out}", file=sys.stderr)
    return result


def _geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def _report_forecast(args: argparse.Namespace, sweep: SweepDir) -> dict:
    """DIR/forecast.json when it forecasts this metric; else a leave-the-largest-budget-out
    check made now, from rows that include the largest budget (said so in the report)."""
    if sweep.forecast.is_file():
        existing = json.loads(sweep.forecast.read_text())
        if existing.get("metric") == args.metric:
            return existing
    rows = read_rows(sweep.rows)
    budgets = sorted({float(r["budget"]) for r in rows if r.get("budget") is not None})
    if len(budgets) < 3:
        return {"skipped": f"{len(budgets)} budgets: a forecast needs at least 2 to fit and 1 to hold out"}
    flops = _geomean([float(r["flops"]) for r in rows if float(r["budget"]) == budgets[-1]])
    try:
        return fc.forecast_rows(rows, args.metric, budgets[-1], flops)
    except FitError as exc:
        return {"skipped": str(exc)}


def _fit_text(r: dict) -> str:
    def show(key: str) -> str:
        if r[key] is None:
            return f"  {key:<22} not fitted"
        lo, hi = r[f"{key}_lo"], r[f"{key}_hi"]
        ends = r["open_intervals"].get(key, [])
        band = (f" [{'<=' if 'lo' in ends else ''}{lo:.4g}, {hi:.4g}{'+' if 'hi' in ends else ''}]"
                if lo is not None and hi is not None else " [no interval]")
        method = r["interval_method"].get(key, "")
        return f"  {key:<22} {r[key]:.4g}{band}  {method}{'  NOT DETERMINED' if key in r['undetermined'] else ''}"

    keys = ("alpha", "beta", "E", "A", "B", "isoflop_exponent", "parametric_exponent", "frontier_E", "frontier_A",
            "frontier_alpha", "n_opt_isoflop", "n_opt_parametric")
    failed = r["bootstrap"]["failed"]["isoflop"]
    return "\n".join([f"fit of {r['metric']} over {r['rows']} runs, {r['budgets']} budgets (80% intervals; IsoFLOP "
                      f"by a row bootstrap of {r['bootstrap']['samples']} resamples, {failed} failed refits)"]
                     + [show(k) for k in keys]
                     + [f"  N_opt at {r['n_opt_budget_flops']:.3g} FLOPs; c = {r['flops_per_param_image']:.3g} FLOPs "
                        f"per parameter per image"]
                     + [f"  not fitted: {name}: {message}" for name, message in r["errors"].items()]
                     + [f"  warning: {text}" for text in [*r["undetermined"].values(), *r["warnings"]]])


if __name__ == "__main__":
    sys.exit(main())
