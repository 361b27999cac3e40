"""Proof that training learns: pretrain the small_cpu preset (train.seed 0) on the embedded
MNIST digits (mnist5k, 4,000 train images) and evaluate its target encoder against the same
encoder at random init (the run's seed: the exact weights training started from), with the
CLI's own protocols on the held-out 1,000 validation digits.

Measured with benchmarks/learning.py (the same probes) on 2 CPU cores, train.seed 0-4
(benchmarks/results/learning_20261203T104719Z.json): kNN gains +14.9 / +21.8 / +25.4 /
+19.7 / +27.0, linear gains +6.2 / +4.1 / +4.6 / -2.1 / +1.3. So the kNN margin (10) holds
on every seed tried, and the linear margin (3) is seed 0's: it guards the demo's result
(seed 0 is what `make demo` runs), not a property of every seed. The four-block debug_cpu
(+0.5), patch 8 at 64 px, and two large target blocks (benchmarks/results/learning_*) fail it.
"""

import json
import time

import pytest
import torch

from scalejepa.eval.cli import main as eval_main
from scalejepa.train import main as train_main

DATA = ["--train-shards", "builtin:mnist5k:train", "--val-shards", "builtin:mnist5k:val", "--num-workers", "0"]


def evaluate(capsys, *argv) -> dict:
    assert eval_main([*argv, *DATA]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def both_cores():
    """Training is single-process here (its loader workers mostly wait): give it both of
    CI's cores instead of conftest's one intra-op thread (a third faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_pretraining_beats_random_init(tmp_path, capsys, both_cores):
    run = tmp_path / "run"
    start = time.monotonic()
    assert train_main(["--config", "small_cpu", "--run-dir", str(run)]) == 0
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
    assert knn["gain_top1"] >= 10.0, report
    assert linear["gain_top1"] >= 3.0, report
