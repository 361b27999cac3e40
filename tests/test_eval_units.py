"""Evaluation building blocks on synthetic tensors: kNN vote, linear probe, collapse
monitors, architecture inference, the random-init baseline."""

import math

import pytest
import torch
import torch.nn.functional as F

from scalejepa.config import load_config
from scalejepa.eval.features import reader_share
from scalejepa.eval.knn import knn_classify, knn_report
from scalejepa.eval.linear import holdout_split, linear_probe
from scalejepa.eval.monitors import (
    collapse_metrics,
    feature_std,
    position_moments,
    position_share,
    position_share_from_moments,
    rankme,
)
from scalejepa.eval.weights import (
    EncoderSpec,
    EncoderWeights,
    WeightsError,
    build_encoder_from,
    infer_spec,
    random_encoder,
    strip_wrappers,
)
from scalejepa.ijepa import build_models
from scalejepa.models.vit import VisionTransformer


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


# ----------------------------------------------------------------------------- kNN


def brute_force_knn(train, train_labels, val, k, temperature, classes):
    train, val = F.normalize(train, dim=1), F.normalize(val, dim=1)
    top1 = []
    for v in val:
        sims = train @ v
        order = sims.argsort(descending=True)[:k]
        votes = torch.zeros(classes)
        for i in order:
            votes[train_labels[i]] += math.exp(float(sims[i]) / temperature)
        top1.append(int(votes.argmax()))
    return torch.tensor(top1)


def test_knn_matches_a_brute_force_weighted_vote():
    train, train_labels = blobs(30, 4, 8, spread=3.0, seed=0)
    val, val_labels = blobs(10, 4, 8, spread=3.0, seed=1)
    results = knn_classify(train, train_labels, val, val_labels, ks=(1, 5, 20), temperature=0.07)
    for k in (1, 5, 20):
        expected = brute_force_knn(train, train_labels, val, k, 0.07, 4)
        assert results[k]["top1"] == pytest.approx(100.0 * float((expected == val_labels).float().mean()))
        assert results[k]["top5"] == 100.0  # only 4 classes


def test_knn_separates_clusters_and_clamps_k():
    train, train_labels = blobs(20, 10, 16, spread=0.1, seed=0)
    val, val_labels = blobs(5, 10, 16, spread=0.1, seed=0)
    results = knn_classify(train, train_labels, val, val_labels, ks=(10, 500))
    assert results[10]["top1"] == 100.0 and 500 in results  # k beyond the 200 samples is clamped
    report = knn_report(results, headline_k=20)
    assert report["k"] == 10 and report["top1"] == 100.0 and set(report["per_k"]) == {"10", "500"}


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_learns_and_picks_the_lr_on_the_held_out_split():
    train, train_labels = blobs(60, 5, 32, spread=2.0, seed=0)
    val, val_labels = blobs(20, 5, 32, spread=2.0, seed=1)
    result = linear_probe(train, train_labels, val, val_labels, lrs=(1e-4, 0.1, 1.0), epochs=20, batch_size=64)
    assert result["top1"] > 90
    held = [row["holdout_top1"] for row in result["per_lr"]]
    assert result["best_lr"] == (1e-4, 0.1, 1.0)[held.index(max(held))]
    assert [row["lr"] for row in result["per_lr"]] == [1e-4, 0.1, 1.0]
    assert result["fit_samples"] + result["holdout_samples"] == 300 and result["val_samples"] == 100


def test_linear_probe_is_deterministic():
    train, train_labels = blobs(40, 3, 8, spread=3.0, seed=0)
    val, val_labels = blobs(10, 3, 8, spread=3.0, seed=1)
    a = linear_probe(train, train_labels, val, val_labels, epochs=5)
    b = linear_probe(train, train_labels, val, val_labels, epochs=5)
    assert a == b


def test_holdout_split_is_a_partition():
    fit, held = holdout_split(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(torch.cat([fit, held]).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="too few"):
        holdout_split(1, 0.5, seed=0)


# ----------------------------------------------------------------------------- monitors


def test_collapse_monitors():
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(2000, 64, generator=g)
    metrics = collapse_metrics(healthy)
    assert set(metrics) == {"feature_std", "rankme"} and all(isinstance(v, float) for v in metrics.values())
    assert metrics["feature_std"] == pytest.approx(1.0, abs=0.05) and metrics["rankme"] > 55
    collapsed = torch.ones(500, 64) + 1e-4 * torch.randn(500, 64, generator=g)
    assert float(feature_std(collapsed)) < 1e-3 and float(rankme(collapsed)) < 1.1
    rank2 = torch.randn(500, 2, generator=g) @ torch.randn(2, 64, generator=g)
    assert 1.5 < float(rankme(rank2)) < 2.05
    # Wide matrices (N < D) use the other Gram matrix; the subsampled path keeps the values close.
    assert float(rankme(healthy[:32])) == pytest.approx(float(rankme(healthy[:32].T.contiguous().T)), rel=1e-5)
    assert collapse_metrics(healthy, max_rows=500)["rankme"] == pytest.approx(metrics["rankme"], rel=0.1)
    with pytest.raises(ValueError, match="N >= 2"):
        collapse_metrics(torch.randn(1, 8))


def test_position_share_separates_position_from_content():
    gen = torch.Generator().manual_seed(0)
    by_position = torch.randn(1, 16, 32, generator=gen).expand(50, 16, 32)  # every image alike
    assert float(position_share(by_position)) == pytest.approx(1.0, abs=1e-4)
    by_content = torch.randn(50, 16, 32, generator=gen)  # nothing depends on the position
    assert float(position_share(by_content)) < 0.05
    mixed = by_position + by_content
    assert 0.3 < float(position_share(mixed)) < 0.7
    # Moments of parts (batches, ranks) add up to the whole's.
    parts = position_moments(mixed[:17]) + position_moments(mixed[17:])
    assert float(position_share_from_moments(parts, 16)) == pytest.approx(float(position_share(mixed)), rel=1e-6)
    with pytest.raises(ValueError, match="B, N, D"):
        position_moments(torch.randn(16, 32))


def test_rankme_matches_an_svd():
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 40)
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum() + 1e-7
    assert float(rankme(x)) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)


# ----------------------------------------------------------------------------- weights


def test_infer_spec_reads_the_architecture_off_the_shapes():
    for arch, size, patch in (("vit_micro", 32, 4), ("vit_tiny", 64, 16)):
        model = VisionTransformer(arch, size, patch, in_chans=3)
        spec = infer_spec({k: v.shape for k, v in model.state_dict().items()})
        assert (spec.arch, spec.image_size, spec.patch_size, spec.in_chans) == (arch, size, patch, 3)
    with pytest.raises(WeightsError, match="not a ViT encoder"):
        infer_spec({"fc.weight": (3, 4)})


def test_strip_wrappers():
    sd = {"module._orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv.weight": 1, "module.norm.bias": 2}
    assert strip_wrappers(sd) == {"blocks.0.attn.qkv.weight": 1, "norm.bias": 2}
    with pytest.raises(WeightsError, match="two entries"):
        strip_wrappers({"module.norm.bias": 1, "norm.bias": 2})


def test_build_encoder_from_rejects_wrong_shapes():
    model = VisionTransformer("vit_micro", 32, 4)
    state = model.state_dict()
    spec = infer_spec({k: v.shape for k, v in state.items()})
    state["blocks.0.attn.qkv.bias"] = torch.zeros(5)
    with pytest.raises(WeightsError, match="qkv.bias"):
        build_encoder_from(EncoderWeights(state, spec, "test"))


def test_random_init_is_the_runs_initial_target_encoder():
    config = load_config("debug_cpu", ["train.seed=7"])
    torch.manual_seed(config.train.seed)  # as scalejepa.parallel.build_engine does
    _, target = build_models(config.model)
    spec = EncoderSpec(config.model.arch, config.model.image_size, config.model.patch_size)
    state = torch.get_rng_state()
    baseline = random_encoder(spec, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, baseline.state_dict()[name]), name


def test_reader_share_covers_every_sample_once():
    # Enough shards: whole shards per reader; too few: every reader scans all, keeps every n-th.
    assert reader_share(5, 1, 2) == ([1, 3], None)
    assert reader_share(1, 1, 4) == ([0], 4)
