"""benchmarks/gpu_suite.sh: its plan fits one GPU call (8 minutes; 5 with --quick), and its smoke
mode runs every step on CPU within the step's budget, writing each step's results file.

The smoke run is the whole suite on tiny shapes (Triton interpreter): about 2-3 minutes on two
idle cores, several times that on a loaded machine; gpu_suite.json records each step's time.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def run_suite(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.parametrize("mode,cap", [((), 480), (("--quick",), 300)])
def test_plan_fits_one_call(mode, cap):
    res = run_suite("--plan", *mode)
    assert res.returncode == 0, res.stderr
    planned = int(re.search(r"required steps: (\d+) s planned of a (\d+) s cap", res.stdout).group(1))
    assert planned <= cap
    assert re.search(r"train_step batch per GPU: \d+ = ", res.stdout)  # the recipe's, or the planner's max
    steps = re.findall(r"^  (\w+)\s+(\d+) s", res.stdout, re.M)
    names = [s for s, _ in steps]
    assert names[:3] == ["setup", "precompile", "kernel_tests"]  # versions, compiles, correctness first
    assert names.index("train_step_compare") < names.index("attention") < names.index("train_step_headline")
    # The headline variant has a budget of its own, before the default's: a slow default cannot cut it.
    assert names.index("train_step_headline") + 1 == names.index("train_step_default")
    if mode:
        assert "train_step_rest" not in names
    else:
        assert names[-2:] == ["train_step_library", "train_step_compile"] and "only if time remains" in res.stdout


def test_runs_from_any_directory_and_names_a_missing_package(tmp_path):
    """Invoked by a relative path from elsewhere, results go to the caller's relative SUITE_DIR;
    setup stops the suite, naming the package, when one the suite needs is missing."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'yaml':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, _Block())\n")
    script = os.path.relpath(SUITE, tmp_path)
    common = {**os.environ, "PYTHON": sys.executable, "SUITE_DIR": "suite"}
    ok = subprocess.run(["bash", script, "--smoke", "setup"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, env=common)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    versions = json.loads((tmp_path / "suite" / "versions.json").read_text())
    assert versions["torch"] and versions["triton"] and "cudnn" in versions and "nccl" in versions
    assert "gpu_suite versions: torch" in ok.stdout
    summary = json.loads((tmp_path / "suite" / "gpu_suite.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["setup"]
    missing = subprocess.run(["bash", script, "--smoke", "setup"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**common, "SUITE_DIR": "suite2", "PYTHONPATH": str(block)})
    assert missing.returncode == 1
    assert "gpu_suite: missing pyyaml: pip install pyyaml" in missing.stderr + missing.stdout
    summary = json.loads((tmp_path / "suite2" / "gpu_suite.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["setup"]  # nothing ran after it


def test_unknown_phase_and_option():
    res = run_suite("--plan", "benchmark_everything")
    assert res.returncode == 2 and "unknown phase" in res.stderr
    res = run_suite("--fast")
    assert res.returncode == 2 and "unknown option" in res.stderr


@pytest.mark.slow
def test_smoke_suite_runs_every_step_within_budget(tmp_path):
    suite_dir, out = tmp_path / "suite", tmp_path / "out"
    res = run_suite("--smoke", env={"SUITE_DIR": str(suite_dir), "OUT": str(out)}, timeout=1500)
    summary = json.loads((suite_dir / "gpu_suite.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    report = "\n".join(f"{s['step']:20s} {s['elapsed_s']:7.1f} s of {s['budget_s']:4d} s  {s['verdict']}"
                       for s in summary["steps"])
    print(f"smoke suite on CPU:\n{report}")
    assert res.returncode == 0, report + "\n" + res.stdout[-3000:] + res.stderr[-3000:]
    expected = ["setup", "precompile", "kernel_tests", "train_step_compare", "attention", "train_step_headline",
                "train_step_default", "train_step_rest", "train_step_library", "train_step_compile"]
    assert list(steps) == expected
    for name in expected[:-2]:
        assert steps[name]["verdict"] == "ok" and steps[name]["elapsed_s"] <= steps[name]["budget_s"], steps[name]
    assert steps["train_step_library"]["verdict"].startswith("skipped")
    assert steps["train_step_compile"]["verdict"].startswith("skipped")
    files = set(os.listdir(suite_dir))
    for prefix in ("gpu_correctness_smoke_", "attention_smoke_", "train_step_smoke_"):
        assert any(f.startswith(prefix) and f.endswith(".json") for f in files), (prefix, files)
    assert {"gpu_kernel_tests.xml", "versions.json", "precompile_compile_check.json"} <= files
    attention = json.loads(next(suite_dir.glob("attention_smoke_*.json")).read_text())
    assert [c["name"] for c in attention["cases"]] == ["vith_context", "vith_predictor"]
    assert all("library_within_3pct" in c for c in attention["cases"])
    correctness = json.loads(next(suite_dir.glob("gpu_correctness_smoke_*.json")).read_text())
    assert correctness["passed"] and correctness["loss"]["relative_difference"] <= 1e-4
    train = json.loads(next(suite_dir.glob("train_step_smoke_*.json")).read_text())
    measured = {v["variant"] for v in train["variants"] if "step_ms_median" in v}
    assert {"truncate_sdpa", "pack_triton", "reference_baseline", "truncate_sdpa_fsdp2"} <= measured
    assert [v["variant"] for v in train["variants"]][:2] == ["pack_triton", "truncate_sdpa"]
    assert not train["pending"] and len(train["resumed"]) >= 2  # one JSON, added to by each step
    # what a lent GPU machine returns: the summary and one tarball of every results file
    assert sorted(os.listdir(out)) == ["gpu_suite.json", "gpu_suite_results.tar.gz"]
    with tarfile.open(out / "gpu_suite_results.tar.gz") as tar:
        assert {Path(n).name for n in tar.getnames()} >= files - {"gpu_suite.json"}
