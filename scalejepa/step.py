"""One I-JEPA training step, the same for the training loop and the benchmarks.

A step is ``grad_accum`` micro-batches of forward + backward, the global batch's mean
loss (one all-reduce), the finite-loss check (the step's one deliberate host sync: a
non-finite loss never reaches the weights), then the optimizer step with the scheduled
learning rate and weight decay, and the EMA update of the target encoder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from scalejepa.dist_env import all_reduce_mean
from scalejepa.parallel.engine import Engine


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one optimizer step."""

    lr: float
    weight_decay: float
    ema_momentum: float


@dataclass
class StepResult:
    loss: torch.Tensor  # the global batch's mean loss, on the device, the same on every rank
    grad_norm: torch.Tensor | None
    batches: list[Any] = field(default_factory=list)  # this step's micro-batches (for accounting)
    data_wait_s: float = 0.0  # host time spent waiting for micro-batches


def train_step(engine: Engine, next_batch: Callable[[], Any], schedule: StepSchedule, *, step: int,
               grad_accum: int = 1, keep_targets: bool = False,
               before_update: Callable[[], None] | None = None) -> StepResult:
    """Run optimizer step ``step`` (0-based) on ``grad_accum`` micro-batches from
    ``next_batch()`` (objects with ``.images`` and ``.masks``).

    ``keep_targets``: keep the last micro-batch's targets in ``engine.last_targets``.
    ``before_update``: called once the loss is known to be finite, before the weights
    change (the trainer waits there for an async checkpoint still reading them).
    Raises :class:`NonFiniteLossError` before the optimizer step on a NaN/inf loss."""
    loss = torch.zeros((), device=engine.device)
    batches, data_wait = [], 0.0
    for micro in range(grad_accum):
        tick = time.perf_counter()
        batch = next_batch()
        data_wait += time.perf_counter() - tick
        keep = keep_targets and micro == grad_accum - 1
        loss += engine.forward_backward(batch.images, batch.masks, 1.0 / grad_accum, keep_targets=keep) / grad_accum
        batches.append(batch)
    loss = all_reduce_mean(loss)  # every rank sees the same value, so every rank stops alike
    if not torch.isfinite(loss):  # the step's one host sync
        raise NonFiniteLossError(
            f"loss is {loss.item()} at step {step} (lr {schedule.lr:.3g}): stopped before the optimizer step, the "
            f"weights are untouched. Lower optim.lr, set optim.clip_grad (e.g. 1.0) or check the data; the run "
            f"can continue from its last checkpoint with --resume auto"
        )
    if before_update is not None:
        before_update()
    grad_norm = engine.step(schedule.lr, schedule.weight_decay)
    engine.update_target(schedule.ema_momentum)
    return StepResult(loss, grad_norm, batches, data_wait)
