"""scalejepa-plan: the fake-tensor trace against real runs on CPU (memory, FLOPs, sharded
bytes, collective volumes), the schedule's overlap rules, the GPU-scale shapes, and bad
input."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from _distributed import REPO, subprocess_env

from scalejepa import flops
from scalejepa.config import ConfigError, load_config
from scalejepa.plan import cli
from scalejepa.plan import hardware
from scalejepa.plan.hardware import GPU_KINDS, Cluster, parse_cluster
from scalejepa.plan.planner import max_micro_batch, price, report
from scalejepa.plan.timeline import LATENCY_INTRA_S, schedule
from scalejepa.plan.trace import Collective, Label, Op, StepTrace, mask_batches, trace_step

# A small custom shape: two blocks, a one-block predictor, micro-batch 4.
SMALL = ["model.arch=custom", "model.width=64", "model.depth=2", "model.heads=2", "model.pred_depth=1",
         "model.pred_dim=32", "train.batch_size=8"]
EXACT = ("params", "grads", "optimizer")


def _compare_memory(fake: dict, real: dict, fake_peak: float, real_peak: float) -> None:
    for key in EXACT:
        assert fake[key] == real[key], (key, fake, real)
    assert fake_peak == pytest.approx(real_peak, rel=0.10), (fake, real)


def test_fake_memory_equals_real_memory_on_one_process():
    config = load_config("debug_cpu", SMALL)
    fake = trace_step(config, 1, record_ops=False)
    real = trace_step(config, 1, fake=False, record_ops=False)
    assert fake.memory["optimizer"] > 0 and fake.memory["activations"] > 0
    _compare_memory(fake.memory, real.memory, fake.peak_bytes, real.peak_bytes)


@pytest.fixture(scope="module")
def two_rank_real(tmp_path_factory):
    """The same trace on real tensors in a real 2-rank gloo FSDP2 run."""
    out = tmp_path_factory.mktemp("plan") / "rank0.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "_plan_rank.py"), str(out), *SMALL, "distributed.backend=fsdp2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_fake_world_of_two_equals_a_real_two_rank_run(two_rank_real):
    """Sharded parameters, gradients and optimizer state per rank, the peak, and the bytes
    of every all-gather and reduce-scatter: a fake process group of 2 against gloo."""
    fake = trace_step(load_config("debug_cpu", [*SMALL, "distributed.backend=fsdp2"]), 2)
    _compare_memory(fake.memory, two_rank_real["memory"], fake.peak_bytes, two_rank_real["peak"])
    totals = fake.totals()
    for kind in ("all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes"):
        assert totals[kind] == two_rank_real["totals"][kind], kind
    assert totals["all_gather_bytes"] > 0 and totals["reduce_scatter_bytes"] > 0
    assert totals["flops"] == two_rank_real["totals"]["flops"]


def _analytic_flops(config, trace: StepTrace) -> float:
    """scalejepa.flops on the mask batches the trace ran (rank 0)."""
    masks = mask_batches(config, trace.micro_batch, trace.micro_batches_traced, 0, 0, trace.masks)
    return sum(flops.batch_flops(config, m).total for m in masks)


@pytest.mark.parametrize("overrides", [
    ["mask.context=truncate", "model.attn_impl=sdpa"],
    ["mask.context=pack", "model.attn_impl=triton", "mask.mode=corrected"],
], ids=["truncate-sdpa", "pack-triton"])
def test_traced_flops_equal_the_analytic_count(overrides):
    config = load_config("debug_cpu", [*overrides, "train.batch_size=6", "train.grad_accum=2"])
    trace = trace_step(config, 1)
    assert trace.micro_batches_traced == 2
    assert trace.totals()["flops"] == pytest.approx(_analytic_flops(config, trace), rel=0.01)
    # Each op lands in its phase: the backward of the context encoder and predictor is ~2x
    # their forward (the patch embedding's backward skips the image gradient).
    by_phase = {}
    for op in (e for e in trace.events if isinstance(e, Op)):
        by_phase[op.phase] = by_phase.get(op.phase, 0.0) + op.flops
    assert by_phase["backward"] == pytest.approx(2 * by_phase["context_predictor"], rel=0.05)


@pytest.mark.parametrize("arch", [
    ["model.width=1280", "model.heads=16", "model.pred_depth=1"],  # ViT-H/14: head dim 80
    ["model.width=1408", "model.heads=16", "model.mlp_ratio=4.363636363636363", "model.patch_size=16",
     "model.pred_depth=1"],  # ViT-G/16: head dim 88, MLP 6144
], ids=["vit-h14", "vit-g16"])
@pytest.mark.parametrize("attention", [["mask.context=truncate"], ["mask.context=pack", "model.attn_impl=triton"]],
                         ids=["truncate", "pack-triton"])
def test_gpu_shapes_trace_in_bf16_over_many_ranks(arch, attention):
    """The GPU configuration (bf16 FSDP2 mixed precision, head dims 80 and 88, 224 px) at
    two encoder blocks, over a fake HSDP world of 2 nodes x 8."""
    overrides = ["model.arch=custom", "model.depth=2", "model.image_size=224", *arch, *attention,
                 "distributed.backend=fsdp2", "distributed.shard_group_size=8", "train.batch_size=64"]
    config = load_config("vit_h14_in1k_ep300", overrides)
    trace = trace_step(config, 16)
    assert trace.config.train.precision == "bf16"
    assert trace.memory["params"] > 0 and trace.memory["activations"] > 0
    matmuls = [e for e in trace.events if isinstance(e, Op) and e.flops and e.phase != "optimizer"]
    assert {e.dtype for e in matmuls} == {"torch.bfloat16"}  # every matmul runs in bf16
    comms = [e for e in trace.events if isinstance(e, Collective)]
    assert {len(c.ranks) for c in comms if c.kind == "all_gather"} == {8}  # sharded within a node
    assert any(c.kind == "all_reduce" and len(c.ranks) == 2 for c in comms)  # gradients across the 2 nodes
    assert trace.totals()["flops"] == pytest.approx(_analytic_flops(trace.config, trace), rel=0.01)


# ----------------------------------------------------------------------------- the schedule


def _trace(events) -> StepTrace:
    return StepTrace(load_config("debug_cpu"), 8, 1, 1, 1, events=events)


def test_schedule_hides_the_next_gather_under_compute_and_exposes_the_first_and_last():
    cluster = parse_cluster("h100-sxm:1x8")
    rates = cluster.rates()
    unit_bytes = int(0.9e-3 * rates["intra_node_bytes"] * 8 / 7)  # ~0.9 ms per all-gather
    compute_bytes = 2e-3 * rates["hbm_bytes"]  # 2 ms of memory-bound work
    ranks = tuple(range(8))

    def unit(name, phase):
        gather = f"FSDP::all_gather ({name})"
        return [Label(gather, phase), Collective("all_gather", unit_bytes, ranks, gather, phase),
                Label(f"FSDP::all_gather_copy_out ({name})", phase), Op(phase, 0.0, compute_bytes, None)]

    forward = unit("a", "context_predictor") + unit("b", "context_predictor")
    backward = [Op("backward", 0.0, compute_bytes, None),
                Collective("reduce_scatter", unit_bytes, ranks, "FSDP::post_backward_reduce (b)", "backward")]
    update = [Op("optimizer", 0.0, 1.0, None)]
    step = schedule(_trace(forward + backward + update), cluster)
    gather = LATENCY_INTRA_S + unit_bytes * 7 / 8 / rates["intra_node_bytes"]
    # exposed: the first gather, and the reduce-scatter, which the optimizer waits for
    assert step.comm_exposed_s == pytest.approx(2 * gather, rel=1e-6)
    assert step.exposed_by_phase["context_predictor"] == pytest.approx(gather, rel=1e-6)
    assert step.exposed_by_phase["optimizer"] == pytest.approx(gather, rel=1e-6)
    assert step.comm_total_s == pytest.approx(3 * gather, rel=1e-6)


def test_collectives_across_nodes_use_the_network():
    two_nodes = parse_cluster("h100-sxm:2x8")
    one = Collective("all_gather", 10**9, tuple(range(8)), "FSDP::all_gather (x)", "target_forward")
    spread = Collective("all_gather", 10**9, tuple(range(0, 16, 2)), "FSDP::all_gather (x)", "target_forward")
    assert schedule(_trace([one]), two_nodes).comm_bytes == {"intra_node": pytest.approx(10**9 * 7 / 8)}
    assert "inter_node" in schedule(_trace([spread]), two_nodes).comm_bytes
    assert schedule(_trace([spread]), two_nodes).step_s > 5 * schedule(_trace([one]), two_nodes).step_s


# ----------------------------------------------------------------------------- planner


def test_max_batch_is_the_largest_traced_micro_batch_that_fits():
    config = load_config("debug_cpu", [*SMALL, "train.batch_size=64"])
    small = trace_step(config, 1, micro_batch=8, record_ops=False, masks="largest").peak_bytes / 2**30
    budget = 1.3 * small  # room for about a third more images than 8
    gpu = dataclasses.replace(GPU_KINDS["h100-sxm"], memory_gib=(budget + hardware.RESERVED_GIB) / (1 - hardware.FRAGMENTATION))
    cluster = Cluster(gpu, 1, 1)
    found = max_micro_batch(config, cluster)
    best = found["max_batch_per_gpu"]
    assert 8 <= best < 64
    peaks = found["traced_peaks_gib"]
    assert peaks[best] <= cluster.usable_gib()
    one_more = trace_step(config, 1, micro_batch=best + 1, record_ops=False, masks="largest")
    assert one_more.peak_bytes / 2**30 > cluster.usable_gib()
    assert 64 % found["micro_batch_for_global_batch"] == 0


def test_cli_json_has_the_documented_keys(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["--config", "debug_cpu", "--gpus", "a100-80gb:1x4", "distributed.backend=fsdp2",
                     "train.batch_size=16", "--json", str(out), "--md", str(tmp_path / "plan.md")]) == 0
    result = json.loads(out.read_text())
    for key in ("memory_gib", "fits", "step_time_s", "phases_s", "comm_exposed_s", "img_s_per_gpu", "mfu",
                "gpu_hours_per_epoch", "gpu_hours_total", "wall_hours", "world_size", "gpu"):
        assert key in result, key
    assert result["predicted"] is True and result["world_size"] == 4 and result["gpu"] == "a100-80gb"
    assert set(result["memory_gib"]) == {"params", "grads", "optimizer", "activations", "other", "peak"}
    assert set(result["phases_s"]) == {"target_forward", "context_predictor", "backward", "optimizer", "ema",
                                       "data_wait"}
    assert result["step_time_s"] == pytest.approx(sum(result["phases_s"].values()) + result["comm_exposed_s"])
    assert "PREDICTED" in capsys.readouterr().out


def test_deepspeed_model_states_come_from_deepspeed_estimators():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = load_config("debug_cpu", [*SMALL, "distributed.backend=deepspeed", "distributed.zero_stage=2"])
    cluster = parse_cluster("a100-40gb:1x2")
    result = report(price(config, cluster), cluster)
    _, states = estimate_zero2_model_states_mem_needs(flops.param_counts(config)["trainable"], 2, 1, cpu_offload=False)
    assert result["memory_gib"]["model_states"] == pytest.approx(states / 2**30)
    assert result["analytic_parts"] is True and result["comm_total_s"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "v100:1x8"], "known kinds: a100-40gb"),
    (["--gpus", "h100-sxm:3"], "is not divisible by world size x train.grad_accum = 3 x 1"),
    (["--gpus", "h100-sxm:1x2", "model.arch=custom"], "model.arch=custom needs model.width >= 1"),
    (["--gpus", "h100-sxm:1x2", "train.batchsize=8"], "unknown config key train.batchsize"),
    (["--gpus", "h100-sxm:1x2"], "distributed.backend=none runs one process, not 2"),
])
def test_bad_input_fails_with_trainings_message(argv, message, capsys):
    assert cli.main(["--config", "debug_cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_gpu_kind_lists_the_known_ones():
    with pytest.raises(ConfigError, match="h100-sxm"):
        parse_cluster("rtx4090:1x8")
    assert parse_cluster("h100-sxm:2x8").world_size == 16
    assert torch.isfinite(torch.tensor(parse_cluster("b200:1x8").usable_gib()))


def test_calibration_recovers_phase_efficiencies_from_a_measured_file(tmp_path):
    """A train_step-shaped results file whose phases took 2x (backward) and 1.25x (the rest)
    the planner's prediction: the fit finds those efficiencies and the error vanishes."""
    from scalejepa.plan.calibrate import calibrate

    cluster = parse_cluster("h100-sxm:1x1")
    slower = {"target_forward": 1.25, "context_predictor": 1.25, "backward": 2.0, "optimizer": 1.25, "ema": 1.25}
    variants = []
    for name, overrides in [("truncate_sdpa", ["mask.context=truncate"]), ("pack_sdpa", ["mask.context=pack"])]:
        config = load_config("debug_cpu", [*SMALL, *overrides, "train.batch_size=4"])
        phases = schedule(trace_step(config, 1), cluster).phases_s
        variants.append({"variant": name, "batch": 4, "overrides": overrides, "step_ms_median": 1.0,
                         "phases_ms": {p: 1e3 * t * slower[p] for p, t in phases.items()}})
    path = tmp_path / "train_step_x.json"
    path.write_text(json.dumps({"env": {"device": "NVIDIA H100 80GB HBM3"},
                                "settings": {"preset": "debug_cpu", "overrides": SMALL}, "variants": variants}))
    result = calibrate(path)
    assert result["gpu"] == "h100-sxm"
    assert result["efficiency"]["backward"] == pytest.approx(0.5, rel=1e-6)
    assert result["efficiency"]["target_forward"] == pytest.approx(0.8, rel=1e-6)
    for row in result["variants"]:
        assert row["error_pct"] < -25  # the roofline alone is optimistic here
        assert abs(row["calibrated_error_pct"]) < 0.5


def test_calibration_refuses_a_file_without_phases_or_from_an_unknown_gpu(tmp_path):
    from scalejepa.plan.calibrate import calibrate

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"env": {"device": "cpu (x86_64, 2 logical cores)"}, "settings": {}, "variants": []}))
    with pytest.raises(ConfigError, match="matches no GPU kind"):
        calibrate(path)
    path.write_text(json.dumps({"env": {"device": "NVIDIA H200"}, "settings": {}, "variants": [{"variant": "a"}]}))
    with pytest.raises(ConfigError, match="no variant of this file has phases_ms"):
        calibrate(path)


def test_deepspeed_zero3_partitions_the_model_states():
    config = load_config("debug_cpu", [*SMALL, "distributed.backend=deepspeed"])
    cluster = parse_cluster("a100-40gb:1x4")
    zero2 = report(price(dataclasses.replace(config, distributed=dataclasses.replace(
        config.distributed, zero_stage=2)), cluster), cluster)
    zero3 = report(price(dataclasses.replace(config, distributed=dataclasses.replace(
        config.distributed, zero_stage=3)), cluster), cluster)
    assert zero3["memory_gib"]["model_states"] < zero2["memory_gib"]["model_states"]
    assert zero3["memory_gib"]["target_encoder"] < zero2["memory_gib"]["target_encoder"]
