"""`scalejepa-export`: training checkpoints (no process group) -> plain state dict + sidecar."""

import json
import subprocess
import sys

import pytest
import torch

from scalejepa.export import export_encoder, main
from scalejepa.models.vit import VisionTransformer
from scalejepa.train import main as train_main

TINY = ["train.batch_size=16", "train.log_every=5", "model.pred_depth=2", "data.num_workers=0",
        "data.shuffle_buffer=64", "train.steps=6", "checkpoint.interval=3", "train.seed=3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    assert train_main(["--config", "debug_cpu", "--run-dir", str(run), *TINY]) == 0
    return run


def test_export_newest_checkpoint_matches_the_training_export(run_dir, tmp_path, capsys):
    out = tmp_path / "target.pt"
    assert main([str(run_dir), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "exported vit_micro target encoder" in stdout and str(out) in stdout
    exported = torch.load(out, weights_only=True)
    reference = torch.load(run_dir / "export" / "target_encoder.pt", weights_only=True)
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["format"] == "scalejepa-encoder" and sidecar["format_version"] == 1
    arch = (sidecar["arch"], sidecar["image_size"], sidecar["patch_size"], sidecar["in_chans"])
    assert arch == ("vit_micro", 32, 4, 3)
    assert sidecar["step"] == 6 and sidecar["seed"] == 3 and sidecar["entry"] == "target"
    assert sidecar["mean"] == [0.485, 0.456, 0.406]
    model = VisionTransformer(sidecar["arch"], sidecar["image_size"], sidecar["patch_size"])
    model.load_state_dict(exported, strict=True)  # plain names, nothing missing


def test_export_a_step_and_the_context_encoder(run_dir, tmp_path):
    path, meta = export_encoder(run_dir / "checkpoints" / "step_00000003", tmp_path / "step3.pt")
    assert meta["step"] == 3
    final = torch.load(run_dir / "export" / "target_encoder.pt", weights_only=True)
    step3 = torch.load(path, weights_only=True)
    assert not torch.equal(step3["blocks.0.mlp.fc1.weight"], final["blocks.0.mlp.fc1.weight"])
    _, meta = export_encoder(run_dir, tmp_path / "context.pt", entry="encoder")
    assert meta["entry"] == "encoder"
    context = torch.load(tmp_path / "context.pt", weights_only=True)
    assert context.keys() == final.keys()
    assert not torch.equal(context["blocks.0.mlp.fc1.weight"], final["blocks.0.mlp.fc1.weight"])


def test_export_errors(run_dir, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "do not exist" in capsys.readouterr().err
    assert main([str(run_dir), "--out", str(tmp_path / "x.bin")]) == 2
    assert "should end in .pt" in capsys.readouterr().err


def test_console_entry_point(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scalejepa.export", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "reference I-JEPA" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "scalejepa.eval.cli", "knn", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--random-init" in proc.stdout and "--train-shards" in proc.stdout


def test_a_deepspeed_step_directory_exports_its_target_file(run_dir, tmp_path):
    """DeepSpeed runs keep the target encoder as target_encoder.pt inside the step directory."""
    import shutil

    run = tmp_path / "ds_run"
    shutil.copytree(run_dir, run)
    step = run / "checkpoints" / "step_00000009"
    step.mkdir()
    shutil.copy(run_dir / "export" / "target_encoder.pt", step / "target_encoder.pt")
    (step / "scalejepa_deepspeed.json").write_text('{"world_size": 2, "zero_stage": 3}')
    (step / "COMMITTED").write_text("{}")
    _, meta = export_encoder(run, tmp_path / "ds.pt")
    assert meta["step"] == 9 and meta["seed"] == 3 and meta["source"].endswith("step_00000009/target_encoder.pt")
    with pytest.raises(Exception, match="zero_to_fp32"):
        export_encoder(step, tmp_path / "ds_ctx.pt", entry="encoder")
