"""The forecast path on synthetic rows: fit every budget but the largest, forecast it with
intervals, write forecast.json before the held-out runs exist, add the measurement later
without refitting, and judge it (within 10% and N_opt inside the interval)."""

import dataclasses
import json

import numpy as np
import pytest

from scalejepa.layout import SweepDir
from scalejepa.sweep.cli import main
from scalejepa.sweep.forecast import forecast_rows
from scalejepa.sweep.plan import plan_sweep
from scalejepa.sweep.records import Action, save_plan
from scalejepa.sweep.spec import spec_from_dict
from test_sweep_fit import TRUTH, chinchilla_rows
from test_sweep_plan import MICRO

BUDGETS = np.logspace(15, 19, 5)


def n_opt(c):
    """The law's compute-optimal size at C = 4 N D."""
    return ((TRUTH["alpha"] * TRUTH["A"]) / (TRUTH["beta"] * TRUTH["B"])) ** (1 / 0.65) * (c / 4) ** (0.30 / 0.65)


def isoflop_rows(seed, noise=0.02):
    """Per budget, 5 sizes over 16x around its optimum (as an IsoFLOP sweep is designed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in BUDGETS:
        for n in n_opt(c) * np.logspace(-0.6, 0.6, 5):
            d = c / (4 * n)
            err = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
            rows.append({"params": n, "images": d, "flops": c, "budget": c,
                         "knn_err": err * float(np.exp(noise * rng.standard_normal()))})
    return rows


def test_forecast_of_a_known_law_counts():
    f = forecast_rows(isoflop_rows(seed=0), "knn_err", BUDGETS[-1], BUDGETS[-1])
    assert f["fit_budgets"] == pytest.approx(BUDGETS[:-1].tolist()) and f["fit_rows"] == 20
    assert not f["made_before_measurement"] and f["measured_runs"] == 5
    assert f["predicted_err_lo"] < f["predicted_err"] < f["predicted_err_hi"]
    assert f["predicted_n_opt_lo"] < n_opt(BUDGETS[-1]) < f["predicted_n_opt_hi"]  # the truth, 10^4 x the smallest budget
    assert f["noise_sd"] == pytest.approx(0.02, rel=0.5)
    assert f["err_within_tolerance"] and f["err_relative_error"] < 0.03
    assert f["measured_n_opt_lo"] < f["measured_n_opt"] < f["measured_n_opt_hi"]
    assert f["n_opt_inside"] and f["counts"] is True and f["undetermined"] == {}
    assert len(f["measured_vs_law"]) == 5


def write_sweep(tmp_path, rows):
    """A sweep directory as plan and collect leave it: plan.json (every budget) and runs.jsonl.
    The plan's runs are a micro plan's, given the synthetic rows' budgets and FLOPs."""
    template = plan_sweep(spec_from_dict(MICRO))
    runs = tuple(dataclasses.replace(template.runs[0], name=f"r{i}", budget=r["budget"], flops_est=r["flops"])
                 for i, r in enumerate(isoflop_rows(0)))
    save_plan(dataclasses.replace(template, runs=runs, jobs=tuple((Action("run", r.name),) for r in runs)),
              SweepDir(tmp_path))
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps({**r, "run": f"r{i}"}) + "\n" for i, r in enumerate(rows)))


def test_forecast_first_then_measure(tmp_path, capsys):
    rows = isoflop_rows(seed=5)
    smaller = [r for r in rows if r["budget"] < BUDGETS[-1]]
    write_sweep(tmp_path, smaller)  # the largest budget has not run yet
    assert main(["forecast", str(tmp_path)]) == 0
    before = json.loads((tmp_path / "forecast.json").read_text())
    assert before["made_before_measurement"] and before["measured_err"] is None and before["counts"] is None
    assert before["budget_flops"] == pytest.approx(BUDGETS[-1]) and "not measured yet" in capsys.readouterr().out
    for key in ("metric", "budget_flops", "predicted_err", "predicted_err_lo", "predicted_err_hi", "measured_err",
                "predicted_n_opt", "predicted_n_opt_lo", "predicted_n_opt_hi", "measured_n_opt"):
        assert key in before, key

    write_sweep(tmp_path, rows)  # now it ran and was collected
    assert main(["forecast", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "forecast.json").read_text())
    for key in ("predicted_err", "predicted_err_lo", "predicted_n_opt_hi", "made", "law"):
        assert after[key] == before[key], key  # the prediction stands as written
    assert after["made_before_measurement"] and after["measured_runs"] == 5
    assert isinstance(after["counts"], bool) and after["measured_err"] == min(r["knn_err"] for r in rows[-5:])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["counts"] == after["counts"] and last["measured_n_opt"] == after["measured_n_opt"]

    # Another metric is another forecast: refused without --out or --refit.
    assert main(["forecast", str(tmp_path), "--metric", "linear_err"]) == 2
    assert "holds another forecast" in capsys.readouterr().err


def test_forecast_of_rows_that_do_not_determine_the_law(tmp_path, capsys):
    # 3% noise on a law whose model-size term hides in it, 3 small budgets: no traceback; the
    # forecast names what the smaller budgets leave open.
    rng = np.random.default_rng(0)
    rows = [{**r, "knn_err": r["knn_err"] * float(np.exp(0.03 * rng.standard_normal()))}
            for r in chinchilla_rows(budgets=np.logspace(15, 16, 4), sizes=np.logspace(5, 6, 4))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["forecast", "--runs", str(path)]) == 0
    f = json.loads((tmp_path / "forecast.json").read_text())
    assert f["undetermined"] and all("not determined" in text for text in f["undetermined"].values())
    out = capsys.readouterr().out
    assert "warning:" in out and "counts:" in out
