"""`scalejepa-eval` end to end on a tiny trained run: weights sources, tables and JSON,
the random-init baseline, clear errors, torchrun, and the training-time kNN."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalejepa.data.writer import build_shards
from scalejepa.eval import features as features_mod
from scalejepa.eval.cli import main as eval_main
from scalejepa.eval.knn import KnnEvaluator
from scalejepa.eval.weights import EncoderSpec, WeightsError, load_weights, random_encoder
from scalejepa.train import main as train_main

TINY = ["train.batch_size=16", "train.log_every=5", "model.pred_depth=2", "data.num_workers=0",
        "data.shuffle_buffer=64", "train.steps=10", "checkpoint.interval=5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert train_main(["--config", "debug_cpu", "--run-dir", str(run), *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Small labeled sets: 300 train images in 4 uneven shards, 100 val images in 1 shard."""
    root = tmp_path_factory.mktemp("eval-shards")
    train = build_shards("builtin:mnist5k", root / "train", max_count=300, shard_size=80, split="train")
    val = build_shards("builtin:mnist5k", root / "val", max_count=100, shard_size=100, split="val")
    return str(train.parent), str(val.parent)


def run_eval(capsys, *argv):
    code = eval_main([*argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_knn_on_a_run_directory(run_dir, shards, capsys, tmp_path):
    out_file = tmp_path / "knn.json"
    code, stdout, err = run_eval(capsys, "knn", "--weights", str(run_dir), "--train-shards", shards[0],
                                 "--val-shards", shards[1], "--num-workers", "0", "--out", str(out_file))
    assert code == 0, err
    result = last_json(stdout)
    assert json.loads(out_file.read_text()) == result
    assert result["protocol"] == "knn" and result["k"] == 20 and 0 <= result["top1"] <= 100
    assert set(result["per_k"]) == {"10", "20", "100", "200"}
    assert result["step"] == 10 and "step_00000010" in result["weights"] and not result["random_init"]
    assert result["train_samples"] == 300 and result["val_samples"] == 100 and result["feature_dim"] == 128
    assert "top-1" in stdout and "vit_micro target encoder" in stdout


def test_linear_with_random_baseline_side_by_side(run_dir, shards, capsys):
    code, stdout, err = run_eval(capsys, "linear", "--weights", str(run_dir / "export" / "target_encoder.pt"),
                                 "--train-shards", shards[0], "--val-shards", shards[1], "--num-workers", "0",
                                 "--compare-random", "--epochs", "5", "--lrs", "0.1", "1", "--last-n", "2")
    assert code == 0, err
    result = last_json(stdout)
    baseline = result["random_init_baseline"]
    assert baseline["random_init"] and baseline["seed"] == 0 and result["feature_dim"] == 256
    assert baseline["weights"] is None and baseline["architecture_from"] == result["weights"]
    assert result["best_lr"] in (0.1, 1.0) and len(result["per_lr"]) == 2
    assert result["gain_top1"] == pytest.approx(result["top1"] - baseline["top1"])
    assert "random init top-1" in stdout and "held-out" in stdout


def test_random_init_from_a_preset_and_seeded_baseline(shards, capsys):
    code, stdout, err = run_eval(capsys, "knn", "--random-init", "--config", "debug_cpu", "--k", "5",
                                 "--train-shards", shards[0], "--val-shards", shards[1], "--num-workers", "0")
    assert code == 0, err
    result = last_json(stdout)
    assert result["random_init"] and result["weights"] is None and result["k"] == 5


def test_random_init_linear_probe_of_a_custom_shape_preset(shards, capsys):
    """small_cpu (model.arch=custom, width 96): the demo's own preset, evaluated untrained."""
    code, stdout, err = run_eval(capsys, "linear", "--random-init", "--config", "small_cpu", "--epochs", "2",
                                 "--lrs", "0.1", "--train-shards", shards[0], "--val-shards", shards[1],
                                 "--num-workers", "0")
    assert code == 0, err
    result = last_json(stdout)
    assert result["random_init"] and result["arch"] == "custom" and result["feature_dim"] == 96
    assert result["val_samples"] == 100 and 0 <= result["top1"] <= 100


def test_run_directory_checkpoint_step_and_export_agree(run_dir):
    newest = load_weights(run_dir)
    step10 = load_weights(run_dir / "checkpoints" / "step_00000010")
    exported = load_weights(run_dir / "export" / "target_encoder.pt")
    step5 = load_weights(run_dir / "checkpoints" / "step_00000005")
    assert newest.step == 10 and step5.step == 5 and newest.spec == exported.spec
    for key, value in newest.state_dict.items():
        assert torch.equal(value, step10.state_dict[key]) and torch.equal(value, exported.state_dict[key]), key
    assert not torch.equal(step5.state_dict["norm.weight"], newest.state_dict["norm.weight"])
    context = load_weights(run_dir, entry="encoder")
    assert "context encoder" in context.source
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(context.state_dict[key], newest.state_dict[key])


def test_clear_errors(run_dir, shards, tmp_path, capsys):
    code, _, err = run_eval(capsys, "knn", "--weights", str(tmp_path / "missing"), "--train-shards", shards[0],
                            "--val-shards", shards[1])
    assert code == 1 and "do not exist" in err and "--random-init" in err

    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(WeightsError, match="no committed checkpoint"):
        load_weights(empty_run)

    broken = tmp_path / "broken" / "checkpoints" / "step_00000010"
    shutil.copytree(run_dir / "checkpoints" / "step_00000010", broken)
    (broken / "COMMITTED").unlink()
    with pytest.raises(WeightsError, match="did not finish"):
        load_weights(broken)

    with pytest.raises(SystemExit):  # argparse: neither weights nor a preset
        eval_main(["knn", "--random-init", "--train-shards", shards[0], "--val-shards", shards[1]])
    assert "--config PRESET" in capsys.readouterr().err

    unlabeled = tmp_path / "unlabeled.tar"
    import webdataset as wds

    image = (Path(shards[1]) / "index.json").parent  # any JPEG will do: take one from the val shard
    sample = next(iter(wds.WebDataset(str(next(image.glob("*.tar"))), shardshuffle=False)))
    with wds.TarWriter(str(unlabeled)) as sink:
        for i in range(3):
            sink.write({"__key__": f"x{i}", "jpg": sample["jpg"]})
    code, _, err = run_eval(capsys, "knn", "--weights", str(run_dir), "--train-shards", str(unlabeled),
                            "--val-shards", shards[1], "--num-workers", "0")
    assert code == 1 and "no class label" in err and "scalejepa-make-shards" in err


def test_training_time_knn_decodes_once(shards, monkeypatch):
    calls = []
    original = features_mod.load_images

    def counting(urls, image_size):
        calls.append(len(urls))
        return original(urls, image_size)

    monkeypatch.setattr("scalejepa.eval.knn.load_images", counting)
    encoder = random_encoder(EncoderSpec("vit_micro", 32, 4), seed=0)
    evaluator = KnnEvaluator(shards[0], shards[1], image_size=32, k=10, batch_size=64)
    first, second = evaluator(encoder, "cpu"), evaluator(encoder, "cpu")
    assert first == second and set(first) == {"knn_top1", "knn_top5", "position_share"}
    assert calls == [4, 1]  # train (4 shards) and val (1 shard) decoded on the first call only


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_result(run_dir, shards, tmp_path):
    """Uneven whole-shard shares (4 train shards) and a sample-strided share (1 val shard)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["knn", "--weights", str(run_dir), "--train-shards", shards[0], "--val-shards", shards[1],
              "--num-workers", "0", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "scalejepa.eval.cli", *common, "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "scalejepa.eval.cli", *common, "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["world_size"] == 2 and b["train_samples"] == 300 and b["val_samples"] == 100
    assert a["per_k"] == b["per_k"]
    assert last_json(two.stdout) == b  # only rank 0 prints


def test_features_do_not_depend_on_the_number_of_loader_workers(shards):
    from scalejepa.data.shard_index import resolve_shards
    from scalejepa.eval.features import extract_features

    encoder = random_encoder(EncoderSpec("vit_micro", 32, 4), seed=0)
    kwargs = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=64)
    for spec, count in ((shards[0], 300), (shards[1], 100)):  # whole shards / one shard, sample-strided
        urls = resolve_shards(spec)[0]
        a = extract_features(encoder, urls, num_workers=0, **kwargs)
        b = extract_features(encoder, urls, num_workers=2, **kwargs)
        assert len(a) == count and a.order.unique().numel() == count
        assert torch.equal(a.order, b.order) and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.features, b.features)
