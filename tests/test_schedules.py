"""Schedules: the cosine presets unchanged, WSD values, and WSD branches as exact continuations."""

import dataclasses

import pytest

from scalejepa.config import ConfigError, OptimConfig, load_config
from scalejepa.schedules import Schedules, wsd_branch_step, wsd_decay_steps, wsd_lr


def wsd(**kw):
    base = dict(lr=1e-3, start_lr=1e-4, final_lr=1e-6, schedule="wsd", decay_fraction=0.2, warmup_steps=10,
                weight_decay=0.05, final_weight_decay=0.4, ema=(0.999, 1.0))
    return OptimConfig(**{**base, **kw})


def test_wsd_values():
    s = Schedules(total_steps=100, warmup_steps=0, optim=wsd())
    assert s.warmup == 10
    assert s.lr(0) == pytest.approx(1e-4 + (1e-3 - 1e-4) * 1 / 10)  # tick 1 of the warm-up
    assert s.lr(9) == pytest.approx(1e-3) and s.lr(50) == s.lr(79) == pytest.approx(1e-3)
    assert wsd_decay_steps(100, 0.2) == 20 and wsd_branch_step(100, 0.2) == 80
    assert s.lr(80) == pytest.approx(1e-3 + (1e-6 - 1e-3) * 1 / 20)  # first decay step
    assert s.lr(89) == pytest.approx(1e-3 + (1e-6 - 1e-3) * 10 / 20)
    assert s.lr(99) == pytest.approx(1e-6)
    # Weight decay and EMA momentum are constants: no dependence on the total steps.
    assert {s.weight_decay(i) for i in range(100)} == {0.05}
    assert {s.ema_momentum(i) for i in range(100)} == {0.999}
    assert wsd_lr(5, 100, 0, 0.2, 1e-4, 1e-3, 1e-6) == 1e-3  # no warm-up


def test_wsd_branch_is_an_exact_continuation():
    long = Schedules(1000, 0, wsd())
    for total in (50, 120, 333, 600):
        short = Schedules(total, 0, wsd())
        branch = wsd_branch_step(total, 0.2)
        for step in range(branch):
            assert short.lr(step) == long.lr(step)
            assert short.weight_decay(step) == long.weight_decay(step)
            assert short.ema_momentum(step) == long.ema_momentum(step)
        assert short.lr(branch) < long.lr(branch)  # the cool-down starts right there
        assert short.lr(total - 1) == pytest.approx(1e-6)


def test_cosine_is_unchanged_and_the_default():
    optim = load_config("vit_h14_in1k_ep300").optim
    assert optim.schedule == "cosine"
    s = Schedules(total_steps=1000, warmup_steps=100, optim=optim)
    assert s.lr(99) == pytest.approx(optim.lr) and s.lr(999) == pytest.approx(optim.final_lr)
    assert s.weight_decay(999) == pytest.approx(optim.final_weight_decay)
    assert s.ema_momentum(0) == optim.ema[0] and s.ema_momentum(1000) == optim.ema[1]
    # optim.warmup_steps, when set, overrides the epoch-derived warm-up.
    fixed = Schedules(1000, 100, dataclasses.replace(optim, warmup_steps=10))
    assert fixed.lr(9) == pytest.approx(optim.lr) and s.lr(9) < optim.lr


def test_wsd_config_checks():
    config = load_config("debug_cpu", ["optim.schedule=wsd", "optim.decay_fraction=0.1"])
    assert (config.optim.schedule, config.optim.decay_fraction) == ("wsd", 0.1)
    for bad in ("optim.decay_fraction=0", "optim.decay_fraction=1.5", "optim.warmup_steps=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("debug_cpu", [bad])
    with pytest.raises(ConfigError, match="cosine, wsd"):
        load_config("debug_cpu", ["optim.schedule=linear"])
