"""kernels/compile_check.py: every Triton kernel variant the launchers can pick compiles ahead of
time for a GPU target on this CPU-only machine (no driver), without spills or shared-memory overflow.

The end-to-end test compiles the ViT-H/14 set (encoder head dim 80, predictor head dim 24,
token widths 1280 and 384; bf16, the training dtype) for sm_90a: 31-32 compilations, ~53 s of
CPU time cold with 2 workers (seen: 317 s wall on 2 cores shared at a load of ~12). The compiled
kernels are kept in a persistent Triton cache under the temp dir (one folder per triton
version), so later runs only read them back (seen: 13 s CPU, 50 s wall at that load, mostly the
workers' imports).
The full matrix (sm_90a and sm_80, head dims 64/80/88/24/32, fp16 and bf16) is the committed
report in benchmarks/results/compile_check_*.
"""

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

check = importlib.import_module("scalejepa.kernels.compile_check")
attn = importlib.import_module("scalejepa.kernels.varlen_attention")
gather_tokens = importlib.import_module("scalejepa.kernels.gather_tokens")
predictor_input = importlib.import_module("scalejepa.kernels.predictor_input")
common = importlib.import_module("scalejepa.kernels._common")

CACHE = Path(tempfile.gettempdir()) / f"scalejepa-compile-check-triton-{triton.__version__}"


def _compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    env["TRITON_CACHE_DIR"] = str(CACHE)
    return env


def test_check_iterates_the_launchers_own_config_objects():
    """The candidate lists the autotuner uses and the configs the check compiles are one object."""
    for head_dim in (80, 24):
        variants = attn.compile_variants(head_dim, torch.bfloat16)
        block_d = max(16, triton.next_power_of_2(head_dim))
        for kind, kernel in attn._KERNELS.items():
            compiled = [v.config for v in variants if v.kernel is kernel]
            assert len(compiled) == len(attn.candidates(kind, block_d))
            assert all(a is b for a, b in zip(compiled, attn.candidates(kind, block_d)))
            assert attn._default_config(kind, block_d, torch.bfloat16) is compiled[0]
    for module in (gather_tokens, predictor_input):
        assert all(v.config is common.COPY_GPU_CONFIG for v in module.compile_variants(1280, torch.bfloat16))
    # every tier's first and last config is what SCALEJEPA_AUTOTUNE=0 launches (16-bit / float32)
    for kind, tiers in attn.GPU_CANDIDATES.items():
        for tier, configs in tiers.items():
            assert attn._default_config(kind, tier, torch.float16) is configs[0]
            assert attn._default_config(kind, tier, torch.float32) is configs[-1]


def test_bf16_variants_compile_the_bf16_dot_path():
    """What the check compiles for bf16 is the GPU launch: bf16 tensors into tl.dot, no
    interpreter upcast, tensor-core precision (ieee only for float32)."""
    for dtype in (torch.bfloat16, torch.float32):
        for v in attn.compile_variants(80, dtype):
            assert v.args[0].dtype == dtype  # q (O in the preprocess kernel)
            if "UPCAST" in v.constexprs:
                assert [a.dtype for a in v.args[:3]] == [dtype] * 3  # q, k, v
                assert v.constexprs["UPCAST"] is False
                assert v.constexprs["PRECISION"] == ("ieee" if dtype == torch.float32 else None)


def test_verdicts():
    ok = {"ok": True, "shared_bytes": 100 * 1024, "stack_bytes": 0, "local_bytes": 0}
    plain = attn.candidates("fwd", 128)[0]
    variant = common.CompileVariant(None, (), {}, plain, "x")
    assert check.verdict(ok, variant, 90) == "ok"
    assert check.verdict({**ok, "shared_bytes": 200 * 1024}, variant, 80) == "shared memory over the limit"
    assert check.verdict({**ok, "stack_bytes": 64}, variant, 90) == "spills registers"
    reasoned = common.CompileVariant(None, (), {}, common.LaunchConfig.of(4, 2, "measured faster", BLOCK_M=16), "x")
    assert check.verdict({**ok, "stack_bytes": 64}, reasoned, 90) == "ok"
    assert check.verdict({"ok": False, "error": "boom"}, variant, 90) == "compile error"


@pytest.mark.parametrize("bad,match", [("sm_75", "unknown target"), ("hopper", "unknown target")])
def test_bad_target(bad, match):
    with pytest.raises(ValueError, match=match):
        check.parse_target(bad)
    assert check.parse_target("sm_90a") == 90 and check.parse_target("sm_80") == 80


def test_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "scalejepa.kernels.compile_check", "--target", "sm_90a"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "TRITON_INTERPRET" in res.stderr


def test_vith_kernels_compile_for_sm90a(tmp_path):
    """Every ViT-H/14 launch variant compiles for sm_90a: no error, no spill, shared memory within the limit."""
    report_path = tmp_path / "compile_check.json"
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "scalejepa.kernels.compile_check", "--target", "sm_90a", "--head-dims", "80,24",
         "--widths", "1280,384", "--dtypes", "bf16", "--workers", "2", "--json", str(report_path)],
        env=_compiler_env(), capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    expected = sum(len(attn.candidates(kind, bd)) for kind in attn._KERNELS for bd in (128, 32)) + 2 + 7
    assert len(rows) == expected, f"{len(rows)} variants compiled, {expected} expected"
    assert {r["target"] for r in rows} == {"sm_90a"}
    for r in rows:
        assert r["ok"] and r["verdict"] == "ok", r
        assert 0 < r["registers"] <= 255 and r["stack_bytes"] == 0
        assert r["shared_bytes"] <= check.SHARED_LIMIT[90]
    assert report["passed"] and "not measured" in report["env"]["what"]
    assert report["env"]["triton"] == triton.__version__
    print(f"compile_check sm_90a ViT-H: {len(rows)} variants in {elapsed:.0f} s (cache {CACHE})")


@pytest.mark.parametrize("head_dim,heads,want", [(80, 16, 16), (88, 16, 8), (24, 16, 8), (64, 12, 16), (13, 1, 1)])
def test_stride_align_is_what_the_strides_allow(head_dim, heads, want):
    """The alignment the kernels declare to the compiler divides every stride of the model's layout."""
    q, k, v = torch.empty(5, 3, heads, head_dim, device="meta").unbind(1)
    out = torch.empty(5, heads, head_dim, device="meta")
    align = attn._stride_align((q, k, v, out))
    assert align == want
    assert all(s % align == 0 for t in (q, k, v, out) for s in t.stride()[:-1])
