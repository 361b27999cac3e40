"""The shipped cpu_law spec, cut to a few runs, through the forecast-first plumbing: run
every budget but the largest (each shape's long run stops at its last branch point),
collect, forecast (too few runs here: a clear error, no traceback), then run the held-out
budget (the long runs resume) and collect again."""

import json
import subprocess
import sys

import pytest
import yaml

from _distributed import REPO, subprocess_env
from test_sweep_run import records, sweep

# Real training and probe subprocesses (3 trainings, 4 probes): ~47 s of CPU, measured on
# the shared 2-core VM (75-115 s wall there, under a load of ~6).
pytestmark = pytest.mark.slow


def test_cpu_law_plumbing(tmp_path):
    spec = yaml.safe_load((REPO / "scalejepa" / "configs" / "sweeps" / "cpu_law.yaml").read_text())
    spec.update(shapes=spec["shapes"][:1], budgets={"unit": "steps", "values": [4, 8]})
    spec["overrides"].update({"data.num_workers": 0, "data.shuffle_buffer": 50})
    spec["probe"].update(linear_epochs=1, k=5, num_workers=0)
    assert spec["schedule"]["branch"] and spec["metrics"] == ["knn_err", "linear_err"]
    path = tmp_path / "cpu_law_micro.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    sweep("plan", path, "--out", out)

    first = sweep("run", out, "--hold-out-largest")
    assert "1 jobs to run" in first and "FAILED" not in first
    (short,) = [p.parent for p in (out / "runs").glob("*/sweep_result.json")]
    (trunk,) = (out / "runs").glob("*_T8_s0")
    assert short.name.endswith("_T4_s0") and max(records(trunk)) == 3  # the long run stopped at the branch point
    sweep("collect", out)
    (row,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert row["images"] == 4 * 64 and row["unique_images"] == 256 and row["images_per_epoch"] == 4000
    assert 0 < row["knn_err"] < 1 and 0 < row["linear_err"] < 1 and row["branch_of"] == trunk.name

    # One run cannot fit a law: the forecast says so and writes nothing.
    proc = subprocess.run([sys.executable, "-m", "scalejepa.sweep.cli", "forecast", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "scalejepa-sweep forecast: error:" in proc.stderr and not (out / "forecast.json").exists()

    second = sweep("run", out)
    assert "1 jobs to run" in second and "FAILED" not in second
    log = (trunk / "sweep.log").read_text()
    assert max(records(trunk)) == 8 and log.count("-m scalejepa.train ") == 2  # resumed from its step-3 checkpoint
    assert (trunk / "sweep_result.json").is_file()
    sweep("collect", out)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2
