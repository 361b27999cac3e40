"""CPU smoke modes of benchmarks/train_step.py, loader.py and scaling.py: each runs in
seconds and writes a complete results JSON (device, versions, date, numbers). These check
the scripts, they measure nothing; outputs go to tmp folders."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def check_env(env):
    for key in ("device", "torch", "date", "timestamp_utc", "python", "cpu_count"):
        assert env[key], key
    assert "git_commit" in env and "triton" in env and "loadavg_1_5_15min" in env


@pytest.mark.parametrize("name", ["train_step", "loader", "scaling"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--smoke" in capsys.readouterr().out


def test_train_step_smoke(tmp_path):
    variants = "truncate_sdpa,reference_baseline,truncate_sdpa_fsdp2,truncate_sdpa_ac,reference_code," \
               "truncate_sdpa_cudnn"
    path = load("train_step").main(["--smoke", "--out-dir", str(tmp_path), "--variants", variants])
    data = json.loads(Path(path).read_text())
    check_env(data["env"])
    assert data["smoke"] is True and data["flop_convention"] and data["pending"] == []
    assert data["settings"]["mask_pool"] == 2 and "pool of 2 mask batches" in data["data"]
    by_name = {v["variant"]: v for v in data["variants"]}
    assert list(by_name) == variants.split(",")
    # SDPA pinned to flash, and the profiled step says that flash ran (the CPU's kernel).
    for name in ("truncate_sdpa", "truncate_sdpa_fsdp2", "truncate_sdpa_ac"):
        assert by_name[name]["sdpa_backend"] == "flash"
        assert by_name[name]["attention_ran"]["ops"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
        # every phase of the profiled step timed, for scalejepa-plan --calibrate
        phases = by_name[name]["phases_ms"]
        assert set(phases) == {"data", "target_forward", "context_predictor", "backward", "optimizer", "ema"}
        assert all(t > 0 for t in phases.values()), phases
    assert by_name["reference_baseline"]["attention_ran"]["backends"] == []  # eager matmul + softmax
    # cuDNN has no CPU kernel: recorded with the reason, and the others still ran.
    assert "model.sdpa_backend=cudnn has no CPU kernel" in by_name["truncate_sdpa_cudnn"]["error"]
    for name in ("truncate_sdpa", "reference_baseline"):
        v = by_name[name]
        assert len(v["raw_step_ms"]) == 2 and v["step_ms_median"] > 0 and v["img_s_per_gpu"] > 0
        assert v["gflops_per_image"] > 0 and v["tflops_per_gpu"] > 0 and v["mfu_pct"] is None  # no CPU peak
        assert v["projection"]["gpu_hours_per_epoch"] > 0 and v["projection"]["paper_a100_hours"] == 1152
    assert by_name["reference_baseline"]["ema"] == "per-parameter loop"
    assert by_name["truncate_sdpa"]["ema"] == "foreach lerp"
    assert by_name["truncate_sdpa"]["speedup_vs_reference_baseline"] > 0
    for name in ("truncate_sdpa_fsdp2", "truncate_sdpa_ac"):  # these run on CPU: they must be measured
        assert "error" not in by_name[name], by_name[name]["error"]
        assert by_name[name]["img_s_per_gpu"] > 0, name
    assert by_name["truncate_sdpa_ac"]["checkpointed_modules"] > 0
    assert by_name["truncate_sdpa_fsdp2"]["backend"] == "fsdp2"
    # The reference repository is an optional checkout: measured, or a recorded reason that
    # says how to get it.
    v = by_name["reference_code"]
    assert ("img_s_per_gpu" in v) != ("error" in v)
    assert "img_s_per_gpu" in v or "git clone https://github.com/facebookresearch/ijepa" in v["error"], v["error"]
    assert data["headline"]["best_variant"]
    assert (tmp_path / data["table"]).read_text().count("\n| ") >= 7
    if data["chart"]:
        assert (tmp_path / data["chart"]).stat().st_size > 0


def test_train_step_mask_pool_is_covered_by_the_warm_up(tmp_path):
    with pytest.raises(SystemExit, match="--mask-pool 2 must be between 1 and --warmup 1"):
        load("train_step").main(["--smoke", "--out-dir", str(tmp_path), "--variants", "truncate_sdpa",
                                 "--mask-pool", "2", "--warmup", "1"])


def test_train_step_resumes_an_unfinished_run(tmp_path):
    script = load("train_step")
    common = ["--smoke", "--out-dir", str(tmp_path), "--variants", "truncate_sdpa_ac,reference_baseline"]
    first = json.loads(Path(script.main([*common, "--time-budget", "1e-9"])).read_text())
    assert [v["variant"] for v in first["variants"]] == ["truncate_sdpa_ac"]
    assert first["pending"] == ["reference_baseline"]
    path = script.main([*common, "--resume-json", "latest"])
    data = json.loads(Path(path).read_text())
    assert [v["variant"] for v in data["variants"]] == ["truncate_sdpa_ac", "reference_baseline"]
    assert all("img_s_per_gpu" in v for v in data["variants"]), [v.get("error") for v in data["variants"]]
    assert data["pending"] == [] and len(data["resumed"]) == 1
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_synthetic_path_needs_no_webdataset_braceexpand_deepspeed(tmp_path):
    # The GPU image lacks them: block their import and run what the GPU suite runs.
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('webdataset', 'braceexpand', 'deepspeed'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(BENCH)!r})
import train_step
train_step.main(['--smoke', '--out-dir', {str(tmp_path)!r}, '--variants', 'truncate_sdpa'])
import scaling
scaling.main(['--smoke', '--out-dir', {str(tmp_path)!r}])
import attention
attention.main(['--smoke', '--out-dir', {str(tmp_path)!r}, '--cases', 'vith_predictor', '--no-gathers',
                '--methods', 'triton_varlen,sdpa_padded'])
import gpu_correctness
assert gpu_correctness.main(['--smoke', '--out-dir', {str(tmp_path)!r}, '--override', 'model.pred_depth=1']) == 0
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("train_step_smoke_*.json")).read_text())
    assert "img_s_per_gpu" in data["variants"][0], data["variants"][0].get("error")


def test_loader_smoke(tmp_path):
    path = load("loader").main(["--smoke", "--out-dir", str(tmp_path), "--cache", str(tmp_path / "cache")])
    data = json.loads(Path(path).read_text())
    check_env(data["env"])
    assert data["image_stats"]["images"] >= 5 and set(data["image_stats"]["modes"]) == {"RGB"}
    for name in ("pillow_full", "pillow_draft"):
        assert data["decode"][name]["img_s_per_core"] > 0
    assert "simplejpeg" in data["decode"]  # measured, or why not
    assert [p["workers"] for p in data["pipeline"]] == [0, 1]
    for p in data["pipeline"]:
        assert p["img_s"] > 0, p.get("error")
    cores = data["cores_per_gpu"]["cores"]
    assert cores["goal_h100_600"]["decode:pillow_draft"] > 0
    assert (tmp_path / data["table"]).is_file()


def test_scaling_smoke(tmp_path):
    """The planner over clusters and layouts: a row per (cluster, layout), HSDP only where
    there are several nodes, every row labelled a prediction."""
    path = load("scaling").main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads(Path(path).read_text())
    check_env(data["env"])
    assert [(r["cluster"], r["layout"]) for r in data["rows"]] == [
        ("a100-40gb:1x2", "fsdp2"), ("h100-sxm:2x2", "fsdp2"), ("h100-sxm:2x2", "hsdp")]
    table = (tmp_path / data["table"]).read_text()
    assert "no GPU measured these" in table
    for r in data["rows"]:
        assert r["step_time_s"] > 0 and r["fits"] and r["gpu_hours_total"] == pytest.approx(
            r["gpu_hours_per_epoch"] * r["epochs"])
        # every predicted row is in the table, with its numbers
        assert (f"| {r['cluster']} | {r['layout']} | {r['micro_batch_per_gpu']} x {r['grad_accum']} | "
                f"{r['peak_gib']:.1f} | yes | {1e3 * r['step_time_s']:.0f} |") in table, r


def test_reference_ema_loop_matches_foreach():
    from scalejepa.ema import EMA

    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    targets = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)) for _ in range(2)]
    for t in targets:
        t.load_state_dict(targets[0].state_dict())
    EMA(targets[0], online).update(0.9)
    EMA(targets[1], online, foreach=False).update(0.9)
    for a, b in zip(targets[0].parameters(), targets[1].parameters()):
        torch.testing.assert_close(a, b)


def test_reference_equivalence_without_the_reference_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # for its `_common` import
    with pytest.raises(SystemExit) as exit_info:
        load("reference_equivalence").main(["--reference-dir", str(tmp_path / "ijepa"), "--out-dir", str(tmp_path)])
    assert "git clone https://github.com/facebookresearch/ijepa" in str(exit_info.value)
    assert not list(tmp_path.glob("*.json"))


def test_train_step_isolates_each_variant_in_a_child(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # for _harness's `_common` import
    harness = load("_harness")
    argv = ["--smoke", "--variants", "a,b", "--time-budget=5", "--isolate", "--resume-json", "x.json",
            "--out-dir", "d", "--retry-errors"]
    assert harness.child_argv(argv) == ["--smoke", "--out-dir", "d"]
    path = load("train_step").main(["--smoke", "--isolate", "--out-dir", str(tmp_path), "--variants",
                                    "truncate_sdpa,truncate_sdpa_cudnn"])
    data = json.loads(Path(path).read_text())
    assert data["settings"]["isolate"] is True
    measured, refused = data["variants"]
    assert measured["img_s_per_gpu"] > 0 and measured["attention_ran"]["backends"] == ["flash"]
    assert "no CPU kernel" in refused["error"] and refused["env"] == {"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}
