"""Proof that training learns: pretrain the debug_cpu preset on the embedded MNIST digits
(mnist5k, 4,000 train images) and evaluate its target encoder against the same encoder at
random init (the run's seed: the exact weights training started from), with the CLI's
own protocols on the held-out 1,000 validation digits.

Measured on 2 CPU cores, train.seed 0 / 1 / 2 (~50 s of training on idle cores): kNN
top-1 46.8 / 41.8 / 44.3 against 32.7 / 31.6 / 30.1 at random init (+14.1 / +10.2 /
+14.2), linear probe 80.9 / 81.3 / 81.7 against 80.4 / 79.7 / 80.9 (+0.5 / +1.6 / +0.8);
benchmarks/learning.py records the learning curve and its diagnostics. The linear gain
is small because a random ViT's average-pooled features are already a good linear
feature map on MNIST (~80%, raw pixels ~90%); settings that made pretraining destroy
linear information (patch 8 at 64 px: linear 69.8 against 78.6 at random init; two large
target blocks: 73.0 against 80.4; benchmarks/results/learning_*) fail this test. So it asserts a kNN gain of at least 8 points and a linear probe that is
not below random init, the margins every measured seed of the preset holds.
"""

import json
import time

import pytest

from scalejepa.eval.cli import main as eval_main
from scalejepa.train import main as train_main

DATA = ["--train-shards", "builtin:mnist5k:train", "--val-shards", "builtin:mnist5k:val", "--num-workers", "0"]


def evaluate(capsys, *argv) -> dict:
    assert eval_main([*argv, *DATA]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_pretraining_beats_random_init(tmp_path, capsys):
    run = tmp_path / "run"
    start = time.monotonic()
    assert train_main(["--config", "debug_cpu", "--run-dir", str(run)]) == 0
    train_s = time.monotonic() - start
    knn = evaluate(capsys, "knn", "--weights", str(run), "--compare-random")
    linear = evaluate(capsys, "linear", "--weights", str(run), "--compare-random")
    report = (
        f"kNN top-1 {knn['top1']:.1f} vs random {knn['random_init_baseline']['top1']:.1f} "
        f"({knn['gain_top1']:+.1f}); linear top-1 {linear['top1']:.1f} vs random "
        f"{linear['random_init_baseline']['top1']:.1f} ({linear['gain_top1']:+.1f}); "
        f"training {train_s:.0f} s, total {time.monotonic() - start:.0f} s"
    )
    print(report)
    assert knn["gain_top1"] >= 8.0, report
    assert linear["gain_top1"] >= 0.0, report
