"""Learning-rate, weight-decay and EMA-momentum schedules: pure functions of the step.

Resuming is setting the step. As in the reference, the value used for optimizer step
``s`` (0-based) is the schedule evaluated after ``s + 1`` scheduler ticks for LR and WD,
and at ``s`` for the EMA momentum.

``optim.schedule=cosine`` (the default, the paper presets): cosine LR and weight decay
and a linear EMA ramp over the total steps. ``optim.schedule=wsd``: warmup-stable-decay,
whose weight decay and EMA momentum are constants and whose LR depends on the total steps
only inside its final decay, so a run of T steps equals a longer run up to step
``T - round(decay_fraction * T)``: a sweep trains one long run and branches short
cool-downs from its checkpoints (Hägele et al. 2024; V-JEPA 2 keeps EMA and WD constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scalejepa.config import OptimConfig


def warmup_cosine_lr(step: int, total: int, warmup: int, start_lr: float, lr: float, final_lr: float) -> float:
    """Linear warm-up start_lr -> lr over ``warmup`` steps, then cosine lr -> final_lr."""
    if step < warmup:
        return start_lr + (lr - start_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(final_lr, final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def cosine_weight_decay(step: int, total: int, weight_decay: float, final_weight_decay: float) -> float:
    """Cosine-shaped weight decay from ``weight_decay`` to ``final_weight_decay``."""
    progress = min(step / max(1, total), 1.0)
    value = final_weight_decay + (weight_decay - final_weight_decay) * 0.5 * (1 + math.cos(math.pi * progress))
    lo, hi = sorted((weight_decay, final_weight_decay))
    return min(max(value, lo), hi)


def wsd_lr(step: int, total: int, warmup: int, decay_fraction: float, start_lr: float, lr: float,
           final_lr: float) -> float:
    """Linear warm-up start_lr -> lr over ``warmup`` steps, constant lr, then a linear
    decay lr -> final_lr over the last ``wsd_decay_steps(total, decay_fraction)`` steps."""
    if step < warmup:
        return start_lr + (lr - start_lr) * step / warmup
    decay = wsd_decay_steps(total, decay_fraction)
    decay_start = total - decay
    if step <= decay_start:
        return lr
    return lr + (final_lr - lr) * min(step - decay_start, decay) / decay


def wsd_decay_steps(total: int, decay_fraction: float) -> int:
    """Steps of a WSD run's final decay (at least one)."""
    return max(1, round(decay_fraction * total))


def wsd_branch_step(total: int, decay_fraction: float) -> int:
    """The step a WSD run of ``total`` steps leaves the stable phase: a longer WSD run's
    checkpoint at this step is this run's state there (its branch point)."""
    return total - wsd_decay_steps(total, decay_fraction)


def linear_ema_momentum(step: int, total: int, start: float, end: float) -> float:
    return start + (end - start) * min(step / max(1, total), 1.0)


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    warmup_steps: int  # used unless optim.warmup_steps gives a fixed count
    optim: OptimConfig

    @property
    def warmup(self) -> int:
        return self.optim.warmup_steps or self.warmup_steps

    def lr(self, step: int) -> float:
        o = self.optim
        if o.schedule == "wsd":
            return wsd_lr(step + 1, self.total_steps, self.warmup, o.decay_fraction, o.start_lr, o.lr, o.final_lr)
        return warmup_cosine_lr(step + 1, self.total_steps, self.warmup, o.start_lr, o.lr, o.final_lr)

    def weight_decay(self, step: int) -> float:
        if self.optim.schedule == "wsd":
            return self.optim.weight_decay
        return cosine_weight_decay(step + 1, self.total_steps, self.optim.weight_decay, self.optim.final_weight_decay)

    def ema_momentum(self, step: int) -> float:
        if self.optim.schedule == "wsd":
            return self.optim.ema[0]
        return linear_ema_momentum(step, self.total_steps, *self.optim.ema)
