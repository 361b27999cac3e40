"""Custom model shapes (model.arch=custom): validation, and the analytic parameter and
FLOP counts of scalejepa.flops against the built models and FlopCounterMode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scalejepa import flops
from scalejepa.config import ConfigError, load_config
from scalejepa.ijepa import build_models, compute_targets
from scalejepa.masks import MaskGenerator, mask_rng
from scalejepa.models.vit import VIT_SIZES, count_parameters, model_size

SHAPES = [
    ["model.width=48", "model.depth=3", "model.heads=2", "model.mlp_ratio=2.5", "model.pred_dim=32", "model.pred_depth=2"],
    ["model.width=64", "model.depth=2", "model.heads=8", "model.pred_dim=48", "model.pred_depth=1", "model.pred_heads=2"],
]


def custom(overrides):
    return load_config("debug_cpu", ["model.arch=custom", *overrides])


@pytest.mark.parametrize("overrides", SHAPES)
def test_custom_shape_params_and_flops_equal_the_built_models(overrides):
    config = custom([*overrides, "model.attn_impl=eager", "mask.context=truncate"])
    torch.manual_seed(0)
    model, target = build_models(config.model, config.train.loss)
    size = model_size(config.model)
    assert (model.encoder.embed_dim, len(model.encoder.blocks), model.encoder.num_heads) == (
        size.embed_dim, size.depth, size.num_heads)
    assert model.encoder.blocks[0].mlp.fc1.out_features == size.mlp_hidden_dim
    counts = flops.param_counts(config)
    assert counts["encoder"] == count_parameters(model.encoder) == count_parameters(target)
    assert counts["predictor"] == count_parameters(model.predictor)
    patch = count_parameters(model.encoder.patch_embed)
    assert counts["encoder_non_embedding"] == counts["encoder"] - patch
    grid = config.model.image_size // config.model.patch_size
    masks = MaskGenerator(grid, config.mask)(3, mask_rng(1, 0, 0, 0))
    images = torch.randn(3, 3, config.model.image_size, config.model.image_size)
    with FlopCounterMode(display=False) as counter:
        model(images, masks, compute_targets(target, images, masks)).backward()
    assert counter.get_total_flops() == flops.batch_flops(config, masks).total


def test_named_sizes_are_unchanged():
    assert model_size(load_config("debug_cpu").model) is VIT_SIZES["vit_micro"]


def test_a_custom_shape_loads_for_evaluation_from_its_export(tmp_path):
    from scalejepa.eval.spec import EncoderSpec, EncoderWeights
    from scalejepa.eval.weights import build_encoder_from, load_weights
    from scalejepa.export import write_export
    from scalejepa.ijepa import build_encoder

    config = custom(SHAPES[0])
    encoder = build_encoder(config.model)
    spec = EncoderSpec.from_config(config)
    write_export(EncoderWeights(encoder.state_dict(), spec, source="test"), tmp_path / "custom.pt")
    weights = load_weights(tmp_path / "custom.pt")  # the head count comes from the sidecar
    assert weights.spec == spec and build_encoder_from(weights).num_heads == config.model.heads


@pytest.mark.parametrize("overrides, message", [
    (["model.width=50", "model.depth=2", "model.heads=4"], "not divisible by model.heads=4"),
    (["model.width=48", "model.depth=2", "model.heads=4"], "head dimension .* = 12 must be a multiple of 8"),
    (["model.width=48", "model.depth=0", "model.heads=2"], "model.depth >= 1"),
    (["model.width=48", "model.depth=2", "model.heads=2", "model.mlp_ratio=2.01"], "integer MLP width"),
])
def test_bad_custom_shapes_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        custom(overrides)


def test_shape_keys_need_arch_custom():
    with pytest.raises(ConfigError, match="model.width applies to model.arch=custom only"):
        load_config("debug_cpu", ["model.width=64"])


def test_flops_from_one_step_log_windows_are_exact():
    from scalejepa.sweep.collect import window_totals

    config = custom(SHAPES[0])
    generator = MaskGenerator(config.model.image_size // config.model.patch_size, config.mask)
    batch = config.train.batch_size
    masks = [generator(batch, mask_rng(0, 0, 0, i)) for i in range(3)]
    records = [{"step": i + 1, "context_tokens": m.context_tokens / batch, "target_tokens": m.target_tokens / batch,
                "step_time_s": 0.5} for i, m in enumerate(masks)]
    totals = window_totals(config, records, 0, 3)
    assert totals["flops"] == pytest.approx(sum(flops.batch_flops(config, m).total for m in masks), rel=1e-12)
    assert totals["images"] == 3 * batch and totals["loop_s"] == pytest.approx(1.5)
