"""benchmarks/attention.py --smoke: runs on CPU (Triton interpreter) and writes a complete JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

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
    json_path = load_script().main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads(Path(json_path).read_text())
    env = data["env"]
    assert env["device"] and env["torch"] and env["triton"] and env["date"] and env["timestamp_utc"]
    assert data["smoke"] is True and data["flop_convention"]
    assert {c["name"] for c in data["cases"]} >= {"vith_context", "vith_predictor", "long"}
    for case in data["cases"]:
        for method in ("triton_varlen", "sdpa_padded", "sdpa_truncated"):
            r = case["results"][method]
            for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_tflops"):
                assert r[key] > 0, (case["name"], method, key)
            assert len(r["fwd"]) >= 1  # raw times are kept
        assert "flex_document" in case["results"]  # timed, or the reason it could not run
    assert "triton_vs_sdpa_padded_fwdbwd" in data["cases"][0]
    assert {g["name"] for g in data["gathers"]} == {"gather_tokens", "build_predictor_input"}
    for gather in data["gathers"]:
        assert all(gather["results"][m]["fwdbwd_ms"] > 0 for m in ("triton", "reference"))
    if data.get("chart"):
        assert (tmp_path / data["chart"]).stat().st_size > 0
