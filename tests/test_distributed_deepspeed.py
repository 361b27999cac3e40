"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (its CPU accelerator, gloo, 2 processes under
torchrun): equality with a one-process run, through a stop and a resume from DeepSpeed's
own checkpoint format behind ``--resume auto``."""

import json
import subprocess
import sys

import pytest
import torch

from _distributed import (
    COMMON,
    LOSS_ATOL,
    LOSS_RTOL,
    ONE_STEP,
    REPO,
    assert_losses_match,
    assert_weights_close,
    checkpoint,
    dcp_state,
    exported_target,
    first_loss,
    losses,
    model_part,
    reference,
    subprocess_env,
    torchrun,
    train_here,
)

from scalejepa.layout import DEEPSPEED_SUBDIR

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, tmp_path_factory):
    """2 ranks, ZeRO-<stage>: steps 1-3, stop; then --resume auto to step 6. ZeRO-2 also
    runs the periodic kNN of the target encoder every 3 steps."""
    stage = request.param
    run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "run"
    args = ("distributed.backend=deepspeed", f"distributed.zero_stage={stage}")
    if stage == 2:
        args += ("eval.knn_every=3",)
    torchrun(run_dir, 2, *args, "train.stop_at_step=3")
    resumed = torchrun(run_dir, 2, *args)
    assert "resumed from" in resumed.stderr and "step_00000003 at step 3" in resumed.stderr
    return stage, run_dir


def test_zero_two_ranks_match_one_process(tmp_path_factory, zero_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage, run_dir = zero_run
    ref = reference(tmp_path_factory)
    assert_losses_match(run_dir, ref)
    want = dcp_state(checkpoint(ref))
    step_dir = checkpoint(run_dir)
    model = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_SUBDIR)
    assert_weights_close(dict(model), want["model"])
    assert_weights_close(torch.load(step_dir / "target_encoder.pt"), want["target"])
    exported = exported_target(run_dir)
    assert list(exported) == list(exported_target(ref))
    assert_weights_close(exported, exported_target(ref))


def test_a_zero_checkpoint_initialises_a_one_process_run(tmp_path_factory, zero_run):
    """--init-from a DeepSpeed step directory: its target file and DeepSpeed's zero_to_fp32
    for the trained module; they match the one-process run's weights, and so its first loss."""
    _, run_dir = zero_run
    want = dcp_state(checkpoint(reference(tmp_path_factory)))
    init_dir = tmp_path_factory.mktemp("init_from_zero") / "run"
    assert train_here(init_dir, *ONE_STEP, f"checkpoint.init_from={checkpoint(run_dir)}") == 0
    expected = first_loss(model_part(want, "encoder."), model_part(want, "predictor."), want["target"])
    assert abs(losses(init_dir)[1] - expected) <= 1e-5 * abs(expected)


def test_init_from_an_export_into_zero3(tmp_path_factory):
    """Loaded on the CPU on every rank before deepspeed.initialize partitions it (and the
    target's forward-only engine): the first loss of those weights."""
    export = reference(tmp_path_factory) / "export" / "target_encoder.pt"
    run_dir = tmp_path_factory.mktemp("zero3_init") / "run"
    proc = torchrun(run_dir, 2, "distributed.backend=deepspeed", "distributed.zero_stage=3", *ONE_STEP,
                    f"checkpoint.init_from={export}")
    assert "init: the source has no predictor: it starts fresh" in proc.stderr
    want = first_loss(torch.load(export))
    assert abs(losses(run_dir)[1] - want) <= LOSS_ATOL + LOSS_RTOL * abs(want)


@pytest.mark.parametrize("zero_run", [2], indirect=True, ids=["zero2"])
def test_zero2_periodic_knn_of_the_target_encoder(zero_run):
    _, run_dir = zero_run
    knn = {r["step"]: r["knn_top1"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if "knn_top1" in r}
    assert sorted(knn) == [0, 3, 6] and all(0 <= v <= 100 for v in knn.values()), knn


@pytest.mark.parametrize("zero_run", [2], indirect=True, ids=["zero2"])
def test_zero_checkpoint_on_another_world_size_is_a_clear_error(tmp_path_factory, zero_run):
    _, run_dir = zero_run
    cmd = [sys.executable, "-m", "scalejepa.train", "--config", "debug_cpu", "--run-dir",
           str(tmp_path_factory.mktemp("other_world") / "run"), "--resume", str(checkpoint(run_dir, 3)), *COMMON,
           "distributed.backend=deepspeed", "distributed.zero_stage=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "written by DeepSpeed ZeRO-2 on 2 ranks; this run is ZeRO-2 on 1" in proc.stderr


def test_deepspeed_config_is_generated_from_ours():
    from scalejepa.config import load_config
    from scalejepa.dist_env import DistEnv
    from scalejepa.parallel.deepspeed import deepspeed_config

    config = load_config("debug_cpu", ["train.batch_size=64", "train.grad_accum=2", "distributed.zero_stage=3"])
    env = DistEnv(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    ds = deepspeed_config(config, env, compute_dtype=None)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 2)
    assert ds["gradient_clipping"] == 0.0  # written out: DeepSpeed's default would clip at 1.0
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False
    config = load_config("debug_cpu", ["optim.clip_grad=10", "distributed.reduce_dtype=bf16"])
    ds = deepspeed_config(config, env, compute_dtype=torch.bfloat16)
    assert ds["gradient_clipping"] == 10.0 and ds["bf16"]["enabled"] and ds["communication_data_type"] == "bf16"
