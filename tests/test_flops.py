"""scalejepa.flops: the analytic count against torch's FlopCounterMode, the paper's ViT-H/14
figure, the peak table and the perf/* log scalars.

FlopCounterMode counts matmuls, convolutions and (CUDA) SDPA kernels; the elementwise work
(norms, GELU, softmax, loss) is excluded on both sides. On CPU it does not see SDPA's
kernel, so the exact comparison runs the eager attention (plain matmuls, the reference's
softmax(QK^T)V) and the SDPA run is compared without the attention term.
"""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scalejepa import flops
from scalejepa.config import load_config
from scalejepa.ijepa import build_models, compute_targets
from scalejepa.masks import MaskGenerator, mask_rng
from scalejepa.models.vit import count_parameters


def counted_step_flops(config, batch_size=4, seed=0):
    """(FlopCounterMode total of one fwd+bwd step, analytic StepFlops) on the same batch."""
    torch.manual_seed(0)
    grid = config.model.image_size // config.model.patch_size
    masks = MaskGenerator(grid, config.mask)(batch_size, mask_rng(seed, 0, 0, 0))
    model, target = build_models(config.model, config.train.loss)
    images = torch.randn(batch_size, 3, config.model.image_size, config.model.image_size)
    with FlopCounterMode(display=False) as counter:
        targets = compute_targets(target, images, masks)
        model(images, masks, targets).backward()
    return counter.get_total_flops(), flops.batch_flops(config, masks)


def test_matches_flop_counter_exactly_with_eager_attention():
    config = load_config("debug_cpu", ["model.attn_impl=eager", "mask.context=truncate"])
    counted, analytic = counted_step_flops(config)
    assert analytic.attention > 0
    assert counted == analytic.total  # integers: exact


def test_matches_flop_counter_without_attention_for_packed_sdpa():
    # Packed contexts of different lengths: the linear layers see every kept token; CPU SDPA
    # is invisible to the counter, so the attention term is left out of the comparison.
    config = load_config("debug_cpu", ["model.attn_impl=sdpa", "mask.context=pack"])
    counted, analytic = counted_step_flops(config, batch_size=5, seed=3)
    assert counted == analytic.total - analytic.attention


def test_vith14_reproduces_the_facts_file():
    config = load_config("vit_h14_in1k_ep300")
    # ~68.5 context tokens after truncation at 128 per GPU, ~44 per target block: ~656 GFLOP.
    parts = flops.step_flops(config, [68.5], [44.0] * 4)
    assert parts.target_encoder / 1e9 == pytest.approx(333, abs=1)
    assert parts.context_encoder / 1e9 == pytest.approx(262, abs=1)
    assert parts.predictor / 1e9 == pytest.approx(61, abs=1)
    assert parts.per_image / 1e9 == pytest.approx(656, abs=1)
    # From sampled reference masks at the per-GPU batch of the recipe.
    stats = flops.mask_stats(config, batch_size=128)
    assert 64 <= stats.context_tokens <= 73 and 105 <= stats.context_sampled <= 115
    assert 42 <= stats.target_tokens <= 47
    expected = flops.expected_flops_per_image(config, batch_size=128)
    assert 640e9 <= expected <= 670e9
    per_image = flops.step_flops_per_image(config, stats.context_tokens, stats.target_tokens)
    assert per_image == pytest.approx(expected, rel=2e-3)
    # Keeping every sampled context token (pack) costs ~840 GFLOP.
    packed = flops.expected_flops_per_image(load_config("vit_h14_in1k_ep300", ["mask.context=pack"]), 128)
    assert 820e9 <= packed <= 860e9


def test_param_counts_match_the_models():
    for preset in ("debug_cpu", "vit_b16_in1k"):
        config = load_config(preset)
        with torch.device("meta"):
            model, target = build_models(config.model)
        counts = flops.param_counts(config)
        assert counts["encoder"] == count_parameters(model.encoder) == count_parameters(target)
        assert counts["predictor"] == count_parameters(model.predictor)
    assert flops.param_counts(load_config("vit_h14_in1k_ep300"))["encoder"] == pytest.approx(632e6, rel=0.01)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 NVL", 835.0),
])
def test_peak_table(name, peak):
    assert flops.peak_tflops_for_name(name) == peak


def test_unknown_gpu_warns_and_cpu_has_no_peak():
    with pytest.warns(UserWarning, match="no dense bf16 peak"):
        assert flops.peak_tflops_for_name("Imaginary GPU 9000") is None
    assert flops.peak_tflops("cpu") is None
    assert flops.mfu_pct(1e9, 100.0, None) is None
