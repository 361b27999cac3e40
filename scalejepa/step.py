"""One I-JEPA training step, the same for the training loop and the benchmarks.

A step is ``grad_accum`` micro-batches of forward + backward, the global batch's mean
loss and the ranks' stop requests (one all-reduce of [loss, stop]), the finite-loss check
(the step's one deliberate host sync: a non-finite loss never reaches the weights, and a
NaN on one rank is a NaN on all), then the optimizer step with the scheduled learning rate
and weight decay, and the EMA update of the target encoder. The phases are labelled for
``torch.profiler`` (``PHASES``; the engines label their forward and backward).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scalejepa.dist_env import all_reduce_mean
from scalejepa.parallel.engine import PHASE_BACKWARD, PHASE_CONTEXT_PREDICTOR, PHASE_TARGET_FORWARD, Engine

PHASE_DATA, PHASE_OPTIMIZER, PHASE_EMA = "scalejepa/data", "scalejepa/optimizer", "scalejepa/ema"
PHASES = (PHASE_DATA, PHASE_TARGET_FORWARD, PHASE_CONTEXT_PREDICTOR, PHASE_BACKWARD, PHASE_OPTIMIZER, PHASE_EMA)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one optimizer step."""

    lr: float
    weight_decay: float
    ema_momentum: float


@dataclass(frozen=True)
class BatchCounts:
    """What this rank trained on (host integers, no device sync): the metrics' accounting.
    The counts are kept instead of the batches, whose device images would otherwise stay
    alive through the next step's forward and backward."""

    images: int = 0
    context_tokens: int = 0
    target_tokens: int = 0

    @classmethod
    def of(cls, masks) -> "BatchCounts":
        """The counts of one micro-batch's :class:`scalejepa.masks.MaskBatch`."""
        return cls(masks.batch_size, masks.context_tokens, masks.target_tokens)

    def __add__(self, other: "BatchCounts") -> "BatchCounts":
        return BatchCounts(self.images + other.images, self.context_tokens + other.context_tokens,
                           self.target_tokens + other.target_tokens)


@dataclass
class StepResult:
    loss: torch.Tensor  # the global batch's mean loss, on the device, the same on every rank
    grad_norm: torch.Tensor | None
    counts: BatchCounts = BatchCounts()  # this rank's images and tokens over the step's micro-batches
    data_wait_s: float = 0.0  # host time spent waiting for micro-batches
    stop: bool = False  # some rank asked to stop (preemption): every rank sees the same value


def train_step(engine: Engine, next_batch: Callable[[], Any], schedule: StepSchedule, *, step: int,
               grad_accum: int = 1, keep_targets: bool = False,
               before_update: Callable[[], None] | None = None,
               stop_requested: Callable[[], bool] | None = None) -> StepResult:
    """Run optimizer step ``step`` (0-based) on ``grad_accum`` micro-batches from
    ``next_batch()`` (objects with ``.images`` and ``.masks``).

    ``keep_targets``: keep the last micro-batch's targets in ``engine.last_targets``.
    ``before_update``: called once the loss is known to be finite, before the weights
    change (the trainer waits there for an async checkpoint still reading them).
    ``stop_requested()``: this rank's wish to stop after this step (read once, after the
    micro-batches); the result's ``stop`` is True on every rank if any rank asked.
    Raises :class:`NonFiniteLossError` before the optimizer step on a NaN/inf loss."""
    loss, counts, data_wait = accumulate_gradients(engine, next_batch, grad_accum, keep_targets)
    wants_stop = float(stop_requested is not None and stop_requested())
    # Every rank sees the same values, so every rank stops alike.
    reduced = all_reduce_mean(torch.stack([loss, torch.tensor(wants_stop, device=loss.device)]))
    loss_value, stop = reduced.tolist()  # the step's one host sync
    loss = reduced[0]
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"loss is {loss_value} at step {step} (lr {schedule.lr:.3g}): stopped before the optimizer step, the "
            f"weights are untouched. Lower optim.lr, set optim.clip_grad (e.g. 1.0) or check the data; the run "
            f"can continue from its last checkpoint with --resume auto"
        )
    if before_update is not None:
        before_update()
    grad_norm = apply_update(engine, schedule)
    return StepResult(loss, grad_norm, counts, data_wait, stop=stop > 0)


def accumulate_gradients(engine: Engine, next_batch: Callable[[], Any], grad_accum: int = 1,
                         keep_targets: bool = False) -> tuple[torch.Tensor, BatchCounts, float]:
    """Forward + backward of ``grad_accum`` micro-batches: (mean loss on the device, their
    :class:`BatchCounts`, host seconds spent waiting for them). ``scalejepa.plan`` traces
    this and :func:`apply_update`, the step without its host sync."""
    loss = torch.zeros((), device=engine.device)
    counts, data_wait = BatchCounts(), 0.0
    for micro in range(grad_accum):
        tick = time.perf_counter()
        with torch.profiler.record_function(PHASE_DATA):
            batch = next_batch()
        data_wait += time.perf_counter() - tick
        keep = keep_targets and micro == grad_accum - 1
        loss += engine.forward_backward(batch.images, batch.masks, 1.0 / grad_accum, keep_targets=keep) / grad_accum
        counts += BatchCounts.of(batch.masks)
    return loss, counts, data_wait


def apply_update(engine: Engine, schedule: StepSchedule) -> torch.Tensor | None:
    """The optimizer step with the scheduled values, then the EMA of the target encoder;
    returns the grad norm when clipping."""
    with torch.profiler.record_function(PHASE_OPTIMIZER):
        grad_norm = engine.step(schedule.lr, schedule.weight_decay)
    with torch.profiler.record_function(PHASE_EMA):
        engine.update_target(schedule.ema_momentum)
    return grad_norm
