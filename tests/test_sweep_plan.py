"""Sweep specs and plans: bad input fails before any run starts, budgets become steps,
WSD branches are planned from the long run's checkpoints."""

import json

import pytest

from scalejepa.sweep.cli import main
from scalejepa.sweep.plan import plan_sweep
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


def test_wsd_branch_planning():
    plan = plan_sweep(spec_from_dict({**MICRO, "schedule": {"kind": "wsd", "branch": True, "decay_fraction": 0.2,
                                                            "warmup_fraction": 0.05}}))
    runs = {r["steps"]: r for r in plan["runs"]}
    longest = runs[1000]["name"]
    assert (runs[100]["parent"], runs[100]["from_step"]) == (longest, 80)
    assert (runs[300]["parent"], runs[300]["from_step"]) == (longest, 240)
    assert runs[1000]["parent"] is None
    assert {r["warmup_steps"] for r in plan["runs"]} == {5}  # one warm-up for the long run and its branches
    assert plan["jobs"] == [[
        {"kind": "segment", "run": longest, "stop_at": 80}, {"kind": "run", "run": runs[100]["name"]},
        {"kind": "segment", "run": longest, "stop_at": 240}, {"kind": "run", "run": runs[300]["name"]},
        {"kind": "run", "run": longest}]]
    # Branching trains 1000 + 20 + 60 steps instead of 1400.
    t = plan["totals"]
    assert t["flops_to_train"] / t["flops_of_runs"] == pytest.approx(1080 / 1400)


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
    assert "scalejepa-plan on h100-sxm:1x2 (predicted)" == plan["totals"]["est_source"]
    for run in plan["runs"]:
        assert 0 < run["step_s_est"] < 0.1  # a micro ViT step on an H100: milliseconds
    steps = sum(r["steps"] for r in plan["runs"])
    assert plan["totals"]["est_wall_s"] == pytest.approx(steps * plan["runs"][0]["step_s_est"])
    with pytest.raises(SweepSpecError, match="has 8 GPUs but each run has ranks=2"):
        spec_from_dict({**spec, "estimate": {"gpus": "h100-sxm:1x8"}})
