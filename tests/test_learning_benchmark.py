"""The learning benchmark's own measurements: the per-block features it probes (which must
match the evaluation CLI's pooled features)."""

import importlib.util
from pathlib import Path

import torch

from scalejepa.data.pipeline import normalize
from scalejepa.eval.weights import EncoderSpec, random_encoder

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_learning():
    import sys

    sys.path.insert(0, str(BENCH))  # for its `_common` import
    spec = importlib.util.spec_from_file_location("bench_learning", BENCH / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_tokens_match_the_pooled_eval_features():
    learning = load_learning()
    spec = EncoderSpec("vit_micro", 16, 4)
    encoder = random_encoder(spec, seed=0)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    tokens = learning.block_tokens(encoder, images, spec.mean, spec.std, batch=2)
    assert len(tokens) == len(encoder.blocks) and tokens[-1].shape == (5, 16, encoder.embed_dim)
    with torch.no_grad():
        pooled = encoder.forward_pooled(normalize(images, spec.mean, spec.std), last_n=len(encoder.blocks))
    expected = pooled.view(5, len(encoder.blocks), -1)
    for b, t in enumerate(tokens):
        torch.testing.assert_close(t.mean(1), expected[:, b], rtol=1e-5, atol=1e-5)
