"""Sweep specs and plans: bad input fails before any run starts, budgets become steps,
WSD branches are planned from the long run's checkpoints."""

import dataclasses
import json

import pytest

from scalejepa.layout import SweepDir
from scalejepa.sweep.cli import main
from scalejepa.sweep.plan import plan_sweep
from scalejepa.sweep.records import Action, load_plan, save_plan
from scalejepa.sweep.runner import SweepRunError, check_ranks
from scalejepa.sweep.spec import SweepSpecError, load_spec, spec_from_dict, spec_names

MICRO = {
    "base": "debug_cpu", "overrides": {"train.batch_size": 16},
    "shapes": [{"width": 32, "depth": 1, "heads": 2, "pred_width": 16, "pred_depth": 1}],
    "budgets": {"unit": "steps", "values": [100, 300, 1000]}, "metrics": ["knn_err"],
}


def test_shipped_specs_load():
    assert {"cpu_demo", "vit_in1k_wsd_isoflop"} <= set(spec_names())
    gpu = load_spec("vit_in1k_wsd_isoflop")
    assert gpu.schedule.branch and gpu.schedule.kind == "wsd" and len(gpu.shapes) == 5


def test_cpu_demo_plan(tmp_path, capsys):
    assert main(["plan", "cpu_demo", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert 9 <= len(plan["runs"]) <= 12 and len(plan["jobs"]) == len(plan["runs"])
    assert "est wall" in table and f"{len(plan['runs'])} runs in {len(plan['jobs'])} jobs" in table
    for run in plan["runs"]:
        # A FLOPs budget becomes whole steps: within half a step of it.
        per_step = run["flops_per_image_est"] * run["batch_size"]
        assert abs(run["flops_est"] - run["budget"]) <= per_step / 2 + 1
        assert "model.arch=custom" in run["overrides"] and "optim.schedule=cosine" in run["overrides"]
    params = sorted({r["params"]["encoder"] for r in plan["runs"]})
    assert len(params) == 3 and params[-1] > 5 * params[0]


@pytest.fixture(scope="module")
def branched_plan():
    return plan_sweep(spec_from_dict({**MICRO, "schedule": {"kind": "wsd", "branch": True, "decay_fraction": 0.2,
                                                            "warmup_fraction": 0.05}}))


def test_wsd_branch_planning(branched_plan):
    plan = branched_plan
    runs = {r.steps: r for r in plan.runs}
    longest = runs[1000].name
    assert (runs[100].parent, runs[100].from_step) == (longest, 80)
    assert (runs[300].parent, runs[300].from_step) == (longest, 240)
    assert runs[1000].parent is None
    assert {r.warmup_steps for r in plan.runs} == {5}  # one warm-up for the long run and its branches
    assert plan.jobs == ((
        Action("segment", longest, stop_at=80), Action("run", runs[100].name),
        Action("segment", longest, stop_at=240), Action("run", runs[300].name),
        Action("run", longest)),)
    # Branching trains 1000 + 20 + 60 steps instead of 1400.
    t = plan.totals()
    assert t["flops_to_train"] / t["flops_of_runs"] == pytest.approx(1080 / 1400)


def test_a_spec_that_exists_is_valid():
    """The spec's parts check themselves however they are built (config.py's loader and rules)."""
    spec = spec_from_dict(MICRO)
    assert spec.budgets.values == (100.0, 300.0, 1000.0) and spec.name == ""  # YAML lists made tuples, ints floats
    with pytest.raises(SweepSpecError, match="branch=true needs schedule.kind=wsd"):
        dataclasses.replace(spec.schedule, branch=True)
    with pytest.raises(SweepSpecError, match="repeats a budget"):
        dataclasses.replace(spec.budgets, values=(1, 1))
    with pytest.raises(SweepSpecError, match="ranks=0 must be >= 1"):
        dataclasses.replace(spec, ranks=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ranks = 2


@pytest.mark.parametrize("change, message", [
    ({"shapes": [{"width": 32, "depth": 1, "heads": 2, "hieght": 3}]}, "unknown sweep spec key shapes\\[0\\].hieght"),
    ({"budget": {"values": [1]}}, "unknown sweep spec key budget \\(did you mean budgets\\?\\)"),
    ({"shapes": [{"width": 50, "depth": 1, "heads": 4}]}, "shape w50d1h4.*not divisible by model.heads=4"),
    ({"budgets": {"unit": "flops", "values": [1000]}}, "budget 1000 flops is too small for one step"),
    ({"probe": {"train_shards": "/nonexistent/probe-train"}}, "probe.train_shards=.*missing"),
    ({"schedule": {"kind": "cosine", "branch": True}}, "branch=true needs schedule.kind=wsd"),
    ({"metrics": ["loss"]}, "choose from knn_err, linear_err"),
    ({"schedule": {"kind": "wsd", "branch": True, "warmup_fraction": 0.9}}, "inside the .*warm-up"),
])
def test_bad_specs_fail_before_any_run(tmp_path, capsys, change, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(json.dumps({**MICRO, **change}))
    out = tmp_path / "sweep"
    assert main(["plan", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    with pytest.raises(SweepSpecError, match=message):
        plan_sweep(spec_from_dict(json.loads(spec.read_text())))
    assert not out.exists()  # nothing written, nothing run


def test_gpu_sweep_wall_time_comes_from_the_planner(capsys):
    """estimate.gpus prices each shape's step with scalejepa-plan instead of an assumed rate;
    its cluster must be one run's (ranks GPUs)."""
    spec = {**MICRO, "probe": {"train_shards": "builtin:mnist5k:train", "val_shards": "builtin:mnist5k:val"},
            "ranks": 2, "overrides": {"train.batch_size": 16, "distributed.backend": "fsdp2"}}
    plan = plan_sweep(spec_from_dict({**spec, "estimate": {"gpus": "h100-sxm:1x2"}}))
    assert "scalejepa-plan on h100-sxm:1x2 (predicted)" == plan.totals()["est_source"]
    for run in plan.runs:
        assert 0 < run.step_s_est < 0.1  # a micro ViT step on an H100: milliseconds
    steps = sum(r.steps for r in plan.runs)
    assert plan.totals()["est_wall_s"] == pytest.approx(steps * plan.runs[0].step_s_est)
    with pytest.raises(SweepSpecError, match="has 8 GPUs but each run has ranks=2"):
        spec_from_dict({**spec, "estimate": {"gpus": "h100-sxm:1x8"}})


def test_plan_file_round_trips_and_refuses_what_it_cannot_read(branched_plan, tmp_path):
    sweep = SweepDir(tmp_path)
    save_plan(branched_plan, sweep)
    assert load_plan(sweep) == branched_plan
    raw = json.loads(sweep.plan.read_text())
    assert raw["totals"] == branched_plan.totals()  # for the reader of the file
    for job in raw["jobs"]:  # as version 1 wrote them before the plan was typed: no stop_at on runs
        for action in job:
            if action["kind"] == "run":
                del action["stop_at"]
    sweep.plan.write_text(json.dumps(raw))
    assert load_plan(sweep) == branched_plan
    for change, message in [
        (lambda r: r["runs"][0].update(stepz=3), "unknown sweep plan key runs\\[0\\].stepz \\(did you mean runs\\[0\\].steps\\?\\)"),
        (lambda r: r["runs"][0].update(steps="many"), "runs\\[0\\].steps='many' must be an integer"),
        (lambda r: r["jobs"][0][0].update(run="nope"), "a job names run nope, which is not planned"),
        (lambda r: r.update(version=2), "version 2 plan; .* plan the sweep again"),
    ]:
        bad = json.loads(json.dumps(raw))
        change(bad)
        sweep.plan.write_text(json.dumps(bad))
        with pytest.raises(SweepSpecError, match=message):
            load_plan(sweep)


def test_ranks_must_be_the_processes_the_launcher_starts(tmp_path, capsys):
    """ranks sets the per-rank batch the FLOP estimate assumed: a launcher that would start
    another number of processes is refused before anything runs."""
    spec = spec_from_dict({**MICRO, "ranks": 2, "slurm": {"nodes": 1, "gpus_per_node": 2}})
    check_ranks(spec, "slurm")
    with pytest.raises(SweepRunError, match="assumes ranks=2 processes per run .* the local launcher starts 1: set ranks: 1"):
        check_ranks(spec, "local")
    with pytest.raises(SweepRunError, match="ranks=2 .* the slurm launcher starts 8: make slurm.nodes x "
                                            "slurm.gpus_per_node .* 2"):
        check_ranks(spec_from_dict({**MICRO, "ranks": 2, "slurm": {"nodes": 2, "gpus_per_node": 4}}), "slurm")

    two, one = SweepDir(tmp_path / "two"), SweepDir(tmp_path / "one")
    save_plan(plan_sweep(spec), two)
    assert main(["run", str(two.root)]) == 2
    assert "the local launcher starts 1" in capsys.readouterr().err and not two.logs.exists()
    assert main(["run", str(two.root), "--launcher", "slurm", "--no-submit"]) == 0  # 1 node x 2 = ranks
    assert "--gpus-per-node=2" in two.slurm_script.read_text()
    save_plan(plan_sweep(spec_from_dict(MICRO)), one)  # ranks 1; slurm's default is 1 node x 8 GPUs
    assert main(["run", str(one.root), "--launcher", "slurm", "--no-submit"]) == 2
    assert "the slurm launcher starts 8" in capsys.readouterr().err and not one.slurm_script.exists()
