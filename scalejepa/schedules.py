"""Learning-rate, weight-decay and EMA-momentum schedules: pure functions of the step.

Resuming is setting the step. As in the reference, the value used for optimizer step
``s`` (0-based) is the schedule evaluated after ``s + 1`` scheduler ticks for LR and WD,
and at ``s`` for the EMA momentum.
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


def linear_ema_momentum(step: int, total: int, start: float, end: float) -> float:
    return start + (end - start) * min(step / max(1, total), 1.0)


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    warmup_steps: int
    optim: OptimConfig

    def lr(self, step: int) -> float:
        o = self.optim
        return warmup_cosine_lr(step + 1, self.total_steps, self.warmup_steps, o.start_lr, o.lr, o.final_lr)

    def weight_decay(self, step: int) -> float:
        return cosine_weight_decay(step + 1, self.total_steps, self.optim.weight_decay, self.optim.final_weight_decay)

    def ema_momentum(self, step: int) -> float:
        return linear_ema_momentum(step, self.total_steps, *self.optim.ema)
