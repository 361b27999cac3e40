"""FSDP2 on CPU (gloo, 2 processes under torchrun): equality with a one-process run, DCP
resharding across world sizes (2 -> 1, 1 -> 2), async saves, HSDP and activation
checkpointing, and a rank killed mid-run under ``torchrun --max-restarts=1``."""

import pytest
import torch

from _distributed import (
    STEPS,
    assert_losses_match,
    assert_weights_close,
    checkpoint,
    dcp_state,
    exported_target,
    losses,
    reference,
    torchrun,
    train_here,
)

from scalejepa.config import MaskConfig
from scalejepa.data.pipeline import SyntheticLoader
from scalejepa.masks import MaskGenerator, mask_rng


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 ranks, FSDP2, asynchronous DCP saves at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("fsdp2") / "run"
    torchrun(run_dir, 2, "distributed.backend=fsdp2", "checkpoint.async_save=true")
    return run_dir


def test_synthetic_batches_split_over_ranks():
    """Rank r's synthetic batch is its slice of the one-process batch: images and masks
    (block sizes and positions are the global batch's); truncation is per rank, as the
    real loader's."""
    for context in ("pack", "truncate"):
        masks = MaskGenerator(8, MaskConfig(min_keep=4, context=context))
        whole = SyntheticLoader(batch_size=6, image_size=32, mask_generator=masks, seed=5, start_step=3)
        parts = [SyntheticLoader(batch_size=3, image_size=32, mask_generator=masks, seed=5, rank=r, world_size=2,
                                 start_step=3) for r in range(2)]
        for step in (3, 4):
            full, split = next(whole), [next(p) for p in parts]
            assert torch.equal(full.images, torch.cat([b.images for b in split]))
            assert full.masks.target_tokens == sum(b.masks.target_tokens for b in split)
            assert torch.equal(full.masks.target_index, torch.cat([b.masks.target_index.view(4, 3, -1)
                                                                   for b in split], 1).view(-1))
            if context == "pack":
                assert torch.equal(full.masks.context.index, torch.cat([b.masks.context.index for b in split]))
                continue
            drawn = MaskGenerator(8, MaskConfig(min_keep=4, context="pack"))(6, mask_rng(5, 0, 0, step))
            lengths = torch.diff(drawn.context.seqs.cu_seqlens)
            for rank, part in enumerate(split):  # each rank cuts its 3 contexts to their shortest
                assert part.masks.context.seqs.uniform_len == int(lengths[3 * rank:3 * rank + 3].min())
            assert full.masks.context.seqs.uniform_len == int(lengths.min())


def test_fsdp2_two_ranks_match_one_process(tmp_path_factory, fsdp_run):
    ref = reference(tmp_path_factory)
    assert_losses_match(fsdp_run, ref)
    got, want = dcp_state(checkpoint(fsdp_run)), dcp_state(checkpoint(ref))
    assert_weights_close(got["model"], want["model"])
    assert_weights_close(got["target"], want["target"])
    # The export is full, unsharded and free of wrapper prefixes.
    exported = exported_target(fsdp_run)
    assert list(exported) == list(exported_target(ref))
    assert_weights_close(exported, exported_target(ref))
    assert all(not v.__class__.__name__.startswith("DTensor") for v in exported.values())


def test_dcp_two_ranks_resume_on_one(tmp_path_factory, fsdp_run):
    """Sharded FSDP2 checkpoint -> one plain process (DCP reshards on load)."""
    ref = reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("resume_2_to_1") / "run"
    assert train_here(run_dir, resume=str(checkpoint(fsdp_run, 3))) == 0
    assert_losses_match(run_dir, ref, steps=range(4, STEPS + 1))
    assert_weights_close(dcp_state(checkpoint(run_dir))["model"], dcp_state(checkpoint(ref))["model"])


def test_dcp_one_rank_resumes_on_two_with_hsdp_and_activation_checkpointing(tmp_path_factory):
    """One-process checkpoint -> 2 ranks on a 2-D (replicate x shard) mesh, with
    activation checkpointing and unsharded parameters kept between forward and backward."""
    ref = reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("resume_1_to_2") / "run"
    proc = torchrun(run_dir, 2, "distributed.backend=fsdp2", "distributed.shard_group_size=1",
                    "distributed.activation_checkpointing=true", "distributed.reshard_after_forward=false",
                    resume=str(checkpoint(ref, 3)))
    assert "'replicate': 2, 'shard': 1" in proc.stderr and "activation checkpointing True" in proc.stderr
    assert_losses_match(run_dir, ref, steps=range(4, STEPS + 1))
    assert_weights_close(dcp_state(checkpoint(run_dir))["model"], dcp_state(checkpoint(ref))["model"])
    assert_weights_close(exported_target(run_dir), exported_target(ref))


def test_killed_rank_resumes_from_last_checkpoint(tmp_path_factory, fsdp_run):
    """Rank 1 dies in the middle of step 5 (after the first of its two micro-batches);
    torchrun restarts both ranks, which continue from the step-3 checkpoint."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = torchrun(run_dir, 2, "distributed.backend=fsdp2", script="tests/_faulty_train.py", max_restarts=1,
                    extra_env={"SCALEJEPA_TEST_FAULT_RANK": "1", "SCALEJEPA_TEST_FAULT_MICROSTEP": "9"})
    assert "simulated crash at micro-step 9" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000003 at step 3" in proc.stderr
    got, want = losses(run_dir), losses(fsdp_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(4, STEPS + 1)] == [want[s] for s in range(4, STEPS + 1)]  # bit-identical
    assert_losses_match(run_dir, reference(tmp_path_factory))
    final, uninterrupted = dcp_state(checkpoint(run_dir)), dcp_state(checkpoint(fsdp_run))
    assert all(torch.equal(final["model"][k], uninterrupted["model"][k]) for k in uninterrupted["model"])


def test_activation_checkpointing_on_one_device_matches(tmp_path_factory):
    ref = reference(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("ac_one_device") / "run"
    assert train_here(run_dir, "distributed.activation_checkpointing=true", "train.stop_at_step=3") == 0
    assert [losses(run_dir)[s] for s in (1, 2, 3)] == [losses(ref)[s] for s in (1, 2, 3)]  # recomputation is exact
