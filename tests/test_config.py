import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml

from scalejepa.config import Config, ConfigError, ModelConfig, TrainConfig, load_config, preset_names, save_config

PRESETS = ["debug_cpu", "small_cpu", "vit_b16_in1k", "vit_l16_in1k", "vit_h14_in1k_ep300",
           "vit_h16_448_in1k_ep300", "vit_g16_in22k_ep44"]


def test_all_presets_ship_and_validate():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        assert isinstance(load_config(name), Config)  # loading is validating


def test_presets_follow_the_reference_recipes():
    h14 = load_config("vit_h14_in1k_ep300")
    assert (h14.model.arch, h14.model.patch_size, h14.model.image_size, h14.model.pred_depth) == ("vit_huge", 14, 224, 12)
    assert (h14.train.batch_size, h14.train.epochs, h14.optim.warmup_epochs) == (2048, 300, 40)
    assert (h14.optim.start_lr, h14.optim.lr, h14.optim.final_lr) == (2e-4, 1e-3, 1e-6)
    assert (h14.optim.weight_decay, h14.optim.final_weight_decay, h14.optim.ema) == (0.04, 0.4, (0.996, 1.0))
    assert (h14.mask.num_targets, h14.mask.target_scale, h14.mask.target_aspect) == (4, (0.15, 0.2), (0.75, 1.5))
    assert (h14.mask.context_scale, h14.mask.min_keep, h14.model.pred_dim) == ((0.85, 1.0), 10, 384)
    assert h14.data.crop_scale == (0.3, 1.0)
    h448 = load_config("vit_h16_448_in1k_ep300")
    assert (h448.model.patch_size, h448.model.image_size) == (16, 448)
    g16 = load_config("vit_g16_in22k_ep44")
    assert (g16.model.arch, g16.train.epochs, g16.optim.warmup_epochs, g16.model.pred_depth) == ("vit_giant", 44, 3, 16)
    assert load_config("vit_b16_in1k").model.pred_depth == 6


def test_presets_document_launch_result_and_cost():
    from importlib import resources

    for name in PRESETS:
        header = (resources.files("scalejepa.configs") / f"{name}.yaml").read_text().split("\n\n")[0]
        for word in ("Launch:", "Reaches:", "Costs:"):
            assert word in header, f"{name}.yaml header lacks {word}"


def test_overrides_are_typed():
    config = load_config("debug_cpu", ["optim.lr=1e-3", "train.steps=7", "mask.context=pack",
                                       "data.crop_scale=[0.4,1.0]", "checkpoint.async_save=true"])
    assert config.optim.lr == 1e-3 and config.train.steps == 7 and config.mask.context == "pack"
    assert config.data.crop_scale == (0.4, 1.0) and config.checkpoint.async_save is True


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["optim.lrr", "did you mean optim.lr"]),
        ("nosection.x=1", ["nosection"]),
        ("mask.mode=fancy", ["mask.mode", "reference", "corrected"]),
        ("model.attn_impl=xformers", ["sdpa", "triton", "flex"]),
        ("train.steps=ten", ["train.steps", "integer"]),
        ("data.crop_scale=[0.3]", ["data.crop_scale", "2 values"]),
        ("train.steps", ["section.key=value"]),
    ],
)
def test_bad_overrides_name_the_key_and_the_fix(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("debug_cpu", [override])
    for word in words:
        assert word in str(info.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="debug_cpu"):
        load_config("no_such_preset")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        load_config("debug_cpu", ["model.image_size=30"])


def test_a_config_that_exists_is_valid():
    """Every way of building a section checks it (loading, the constructor,
    dataclasses.replace as the planner uses it), and a built config cannot change."""
    config = load_config("debug_cpu")
    with pytest.raises(ConfigError, match="train.batch_size=64 is not divisible by train.grad_accum=3"):
        dataclasses.replace(config.train, grad_accum=3)
    with pytest.raises(ConfigError, match="model.attn_impl='xformers' is not allowed"):
        dataclasses.replace(config.model, attn_impl="xformers")
    with pytest.raises(ConfigError, match="model.arch=custom needs model.width >= 1"):
        ModelConfig(arch="custom")
    with pytest.raises(ConfigError, match="train.preempt_signals: 'SIGNOPE'"):
        TrainConfig(preempt_signals="SIGNOPE")
    with pytest.raises(TypeError, match="Config.train must be a TrainConfig"):
        Config(train={"batch_size": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.batch_size = 3
    fine = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=96, grad_accum=3, epochs=2))
    assert fine.train.grad_accum == 3 and isinstance(fine.train.epochs, float)  # types coerced as from YAML
    assert fine.model is config.model


def test_every_named_arch_has_a_size():
    from scalejepa.models.vit import VIT_SIZES

    archs = typing.get_args(typing.get_type_hints(ModelConfig)["arch"])
    assert set(archs) == {*VIT_SIZES, "custom"}


@pytest.mark.parametrize("attn_impl, gather_impl, gathers", [
    ("sdpa", "auto", "torch"), ("triton", "auto", "triton"),  # auto: what attn_impl alone chose before
    ("triton", "torch", "torch"), ("sdpa", "triton", "triton"),
])
def test_gather_kernels_are_their_own_choice(attn_impl, gather_impl, gathers):
    model = load_config("debug_cpu", [f"model.attn_impl={attn_impl}", f"model.gather_impl={gather_impl}"]).model
    assert model.gathers == gathers


def test_resolved_config_round_trips(tmp_path):
    config = load_config("vit_h14_in1k_ep300", ["train.seed=3"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == config and isinstance(again, Config)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 3


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "scalejepa.train", "--config", "debug_cpu", "--run-dir", str(run_dir), "optim.lrr=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key optim.lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
