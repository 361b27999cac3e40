"""benchmarks/attention.py --smoke: runs on CPU (Triton interpreter) and writes a complete JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

from scalejepa.config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--smoke" in capsys.readouterr().out


def test_smoke_writes_json(tmp_path):
    script = load_script()
    json_path = script.main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads(Path(json_path).read_text())
    env = data["env"]
    assert env["device"] and env["torch"] and env["triton"] and env["date"] and env["timestamp_utc"]
    assert data["smoke"] is True and data["flop_convention"]
    assert {c["name"] for c in data["cases"]} >= {"vith_context", "vith_predictor", "long"}
    assert data["settings"]["calls_per_sample"] == 2 and data["timing"]
    for case in data["cases"]:
        for method in ("triton_varlen", "sdpa_padded", "sdpa_truncated"):
            r = case["results"][method]
            for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_tflops", "fwd_kernel_ms", "fwdbwd_kernel_ms"):
                assert r[key] > 0, (case["name"], method, key)
            assert len(r["fwd"]) >= 1 and r["fwdbwd_kernel"]["calls"] == 2  # raw times are kept
        # What ran, from the profiler: our kernel, and the CPU's flash kernel for unpinned SDPA.
        assert case["results"]["triton_varlen"]["ran"]["backends"] == ["triton (scalejepa)"]
        assert case["results"]["sdpa_padded"]["ran"]["ops"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
        # The library paths without a CPU kernel say why; the others are compared with ours.
        for method in ("torch_varlen", "sdpa_nested_flash", "sdpa_nested_cudnn", "sdpa_padded_cudnn",
                       "flex_document"):
            r = case["results"][method]
            assert "fwdbwd_ms" in r or r.get("error") or r.get("error_bwd"), (case["name"], method)
        assert case["library_within_3pct"]["ratios"]["sdpa_padded"]["fwdbwd_vs_triton"] > 0
    # The settings that library_within_3pct names for each path are ones a config accepts.
    for setting in script.LIBRARY_PATHS.values():
        load_config("debug_cpu", setting.split())
    assert "triton_vs_sdpa_padded_fwdbwd" in data["cases"][0]
    assert {g["name"] for g in data["gathers"]} == {"gather_tokens", "build_predictor_input"}
    for gather in data["gathers"]:
        assert all(gather["results"][m]["fwdbwd_ms"] > 0 for m in ("triton", "reference"))
    if data.get("chart"):
        assert (tmp_path / data["chart"]).stat().st_size > 0


def test_a_run_killed_after_a_case_keeps_it(tmp_path, monkeypatch):
    script = load_script()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the suite's timeout")

    monkeypatch.setattr(script, "gather_benchmarks", killed)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--smoke", "--out-dir", str(tmp_path), "--cases", "vith_predictor",
                     "--methods", "triton_varlen,sdpa_padded"])
    data = json.loads(next(tmp_path.glob("attention_smoke_*.json")).read_text())
    assert [c["name"] for c in data["cases"]] == ["vith_predictor"]
    assert data["cases"][0]["results"]["triton_varlen"]["fwdbwd_ms"] > 0
