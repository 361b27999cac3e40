"""``scalejepa-train --init-from SOURCE``: every kind of source starts a run whose first loss
is the loss of the same weights computed here directly (one process, and FSDP2 on 2 gloo
ranks), the run records where its weights came from, and every mismatch is explained."""

import json
import shutil

import pytest
import torch
import yaml
from _distributed import (
    LOSS_ATOL,
    LOSS_RTOL,
    ONE_STEP,
    checkpoint,
    dcp_state,
    first_loss,
    losses,
    model_part,
    reference,
    torchrun,
    train_here,
)

from scalejepa.eval.spec import EncoderSpec, EncoderWeights
from scalejepa.eval.weights import random_encoder
from scalejepa.export import export, write_export


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The reference run (6 steps, checkpoints at 3 and 6) and its weights in every form."""
    run = reference(tmp_path_factory)
    folder = tmp_path_factory.mktemp("init_sources")
    step3, step6 = dcp_state(checkpoint(run, 3)), dcp_state(checkpoint(run, 6))
    encoder, predictor = model_part(step3, "encoder."), model_part(step3, "predictor.")
    official = {"encoder": {f"module.{k}": v for k, v in encoder.items()},
                "predictor": {f"module.{k}": v for k, v in predictor.items()},
                "target_encoder": {f"module.{k}": v for k, v in step3["target"].items()},
                "opt": {}, "epoch": 3}
    torch.save(official, folder / "IN1K-vit.micro-3e.pth.tar")
    exported = {fmt: export(run, folder / fmt, fmt)[0] for fmt in ("hf", "timm", "safetensors")}
    final_target = step6["target"]
    full = {"encoder": encoder, "predictor": predictor, "target": step3["target"]}
    return {
        "step3": (checkpoint(run, 3), full),
        "run_dir": (run, {"encoder": model_part(step6, "encoder."), "predictor": model_part(step6, "predictor."),
                          "target": final_target}),  # its newest checkpoint
        "reference": (folder / "IN1K-vit.micro-3e.pth.tar", full),
        # Exports hold the target encoder: it becomes the encoder and the target, the predictor starts fresh.
        **{fmt: (path, {"encoder": final_target}) for fmt, path in exported.items()},
        "pt": (run / "export" / "target_encoder.pt", {"encoder": final_target}),
    }


@pytest.mark.parametrize("kind", ["step3", "run_dir", "reference", "hf", "timm", "safetensors", "pt"])
def test_init_from_each_source_one_process(sources, kind, tmp_path, capsys):
    source, weights = sources[kind]
    run_dir = tmp_path / "run"
    assert train_here(run_dir, *ONE_STEP, f"checkpoint.init_from={source}") == 0
    assert losses(run_dir)[1] == first_loss(**weights)  # the same operations: bit-identical
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["checkpoint"]["init_from"] == str(source)
    record = json.loads((run_dir / "init_from.json").read_text())
    assert record["source"].startswith(str(source)) and record["loaded"]["predictor"] == ("predictor" in weights)
    if kind == "reference":
        assert record["licence"] == "cc-by-nc-4.0"
        assert any("predictor head count 4 taken from the config" in note for note in record["notes"])


def test_init_from_on_two_fsdp2_ranks(sources, tmp_path):
    """Loaded on the CPU on every rank, then sharded: the same first loss as one process.
    (An export, encoder only, goes into DeepSpeed ZeRO-3 in test_distributed_deepspeed.)"""
    source, weights = sources["reference"]
    run_dir = tmp_path / "run"
    proc = torchrun(run_dir, 2, "distributed.backend=fsdp2", *ONE_STEP, f"checkpoint.init_from={source}")
    assert "init: loaded encoder" in proc.stderr
    want = first_loss(**weights)
    assert abs(losses(run_dir)[1] - want) <= LOSS_ATOL + LOSS_RTOL * abs(want)


def test_a_run_with_checkpoints_refuses_another_source_and_continues_its_own(sources, tmp_path, capsys):
    run_dir = tmp_path / "run"
    hf, _ = sources["hf"]
    assert train_here(run_dir, *ONE_STEP, f"checkpoint.init_from={hf}") == 0
    capsys.readouterr()
    assert train_here(run_dir, "train.stop_at_step=2", f"checkpoint.init_from={sources['timm'][0]}") == 1
    err = capsys.readouterr().err
    assert "already holds committed checkpoints (newest step_00000001)" in err and "--resume auto" in err
    # The same command again (torchrun --max-restarts, a requeued job): it continues from its checkpoint.
    assert train_here(run_dir, "train.stop_at_step=2", f"checkpoint.init_from={hf}") == 0
    assert sorted(losses(run_dir)) == [1, 2]
    assert json.loads((run_dir / "init_from.json").read_text())["source"] == str(hf)  # kept through the resume
    assert train_here(tmp_path / "other", f"checkpoint.init_from={hf}",
                      resume=str(run_dir / "checkpoints" / "step_00000001")) == 2
    assert "exclude each other" in capsys.readouterr().err


def _message(run_dir, *overrides, capsys) -> str:
    capsys.readouterr()
    assert train_here(run_dir, *overrides) == 2
    return capsys.readouterr().err


def test_another_architecture_is_explained_with_the_overrides_that_fit(sources, tmp_path, capsys):
    err = _message(tmp_path / "run", "model.arch=custom", "model.width=96", "model.depth=2", "model.heads=4",
                   "model.pred_dim=64", f"checkpoint.init_from={sources['reference'][0]}", capsys=capsys)
    assert "does not fit this config's model" in err
    assert "encoder: unexpected (24): blocks.2.norm1.weight" in err and "wrong shapes (" in err
    assert "patch_embed.proj.weight (128, 3, 4, 4) (here (96, 3, 4, 4))" in err and "target encoder: as the encoder" in err
    assert "The source's encoder: width 128, depth 4, MLP 512" in err and "(vit_micro)" in err
    assert "model.arch=vit_micro model.width=0 model.depth=0 model.heads=0" in err
    assert "The source's predictor: width 96, depth 2; this config's: width 64, depth 2" in err
    assert "model.pred_dim=96" in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything is written


def test_missing_and_unexpected_keys_are_named(sources, tmp_path, capsys):
    state = dict(sources["pt"][1]["encoder"])
    del state["norm.weight"], state["norm.bias"]
    state["head.weight"] = torch.zeros(10, 128)
    torch.save(state, tmp_path / "partial.pt")
    err = _message(tmp_path / "run", f"checkpoint.init_from={tmp_path / 'partial.pt'}", capsys=capsys)
    assert "missing (2): norm.weight, norm.bias" in err and "unexpected (1): head.weight" in err


def test_a_custom_shape_is_suggested_with_its_head_count(tmp_path, capsys):
    """A sidecar (or HF / timm config) names the head count; a reference checkpoint does not."""
    spec = EncoderSpec("custom", 32, 4, width=64, depth=2, heads=2)
    write_export(EncoderWeights(random_encoder(spec).state_dict(), spec, "test"), tmp_path / "custom.pt")
    err = _message(tmp_path / "a", f"checkpoint.init_from={tmp_path / 'custom.pt'}", capsys=capsys)
    assert "model.arch=custom model.width=64 model.depth=2 model.heads=2 model.mlp_ratio=4" in err
    encoder = {f"module.{k}": v for k, v in random_encoder(spec).state_dict().items()}
    torch.save({"encoder": encoder, "target_encoder": encoder}, tmp_path / "custom.pth.tar")
    err = _message(tmp_path / "b", f"checkpoint.init_from={tmp_path / 'custom.pth.tar'}", capsys=capsys)
    assert "heads unknown" in err and "model.heads=<the head count it was trained with" in err


def test_a_head_count_that_differs_is_an_error(sources, tmp_path, capsys):
    folder = tmp_path / "hf8"
    shutil.copytree(sources["hf"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8}))
    err = _message(tmp_path / "run", f"checkpoint.init_from={folder}", capsys=capsys)
    assert "encoder: 8 attention heads in the source, 4 in this config" in err
    assert "model.arch=custom model.width=128 model.depth=4 model.heads=8 model.mlp_ratio=4" in err


def test_a_predictor_head_count_that_differs_is_an_error(sources, tmp_path, capsys):
    """A run's config names its predictor's head count (4, the encoder's); 2 here."""
    err = _message(tmp_path / "run", "model.pred_heads=2", f"checkpoint.init_from={sources['step3'][0]}",
                   capsys=capsys)
    assert "predictor: 4 attention heads in the source, 2 in this config" in err and "model.pred_heads=4" in err


def test_an_unfinished_checkpoint_is_refused(sources, tmp_path, capsys):
    step = tmp_path / "step_00000003"
    shutil.copytree(sources["step3"][0], step)
    (step / "COMMITTED").unlink()
    assert train_here(tmp_path / "run", f"checkpoint.init_from={step}") == 1
    assert "has no COMMITTED marker, its save did not finish" in capsys.readouterr().err


def test_unreadable_sources_name_what_was_tried(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not weights")
    assert train_here(tmp_path / "a", f"checkpoint.init_from={tmp_path / 'notes.txt'}") == 1
    assert "none of the formats scalejepa reads; tried safetensors" in capsys.readouterr().err
    assert train_here(tmp_path / "b", f"checkpoint.init_from={tmp_path / 'nowhere'}") == 1
    assert "does not exist: pass a reference I-JEPA checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train_here(tmp_path / "c", f"checkpoint.init_from={tmp_path / 'empty'}") == 1
    assert "none of the directories scalejepa reads; tried a run directory" in capsys.readouterr().err
