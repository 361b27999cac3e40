"""The training engine: one I-JEPA step on whatever the models were wrapped in.

The loop in `train.py` talks only to this interface, so the single-device, FSDP2 and
DeepSpeed paths differ in how the engine is built (`scalejepa.parallelize`), not in the loop.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from scalejepa.ema import EMA
from scalejepa.ijepa import IJEPA, compute_targets
from scalejepa.masks import MaskBatch
from scalejepa.models.vit import VisionTransformer


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only: biases and 1-D parameters (norms) are excluded."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_config, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model),
        lr=optim_config.lr,
        betas=optim_config.betas,
        eps=optim_config.eps,
        fused=device.type == "cuda",
    )


class TorchEngine:
    """Plain PyTorch modules (one device) or FSDP2-sharded ones: a torch optimizer."""

    def __init__(
        self,
        model: IJEPA,
        target: VisionTransformer,
        optimizer: torch.optim.Optimizer,
        *,
        autocast_dtype: torch.dtype | None,
        clip_grad: float = 0.0,
    ):
        self.model = model
        self.target = target
        self.optimizer = optimizer
        self.autocast_dtype = autocast_dtype
        self.clip_grad = clip_grad
        self.ema = EMA(target, model.encoder)
        self.device = next(model.parameters()).device
        self.last_targets: torch.Tensor | None = None  # kept on request, for the collapse monitors

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, images: torch.Tensor, masks: MaskBatch, loss_scale: float = 1.0,
                         keep_targets: bool = False) -> torch.Tensor:
        """Targets, loss, backward; returns the (detached) loss. ``keep_targets`` keeps this
        batch's targets in ``last_targets`` (else it is cleared, freeing the memory)."""
        with self._autocast():
            targets = compute_targets(self.target, images, masks)
            loss = self.model(images, masks, targets)
        self.last_targets = targets if keep_targets else None
        (loss * loss_scale).backward()
        return loss.detach()

    def step(self, lr: float, weight_decay: float) -> torch.Tensor | None:
        """Optimizer step with the scheduled values; returns the grad norm if clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = weight_decay
        grad_norm = None
        if self.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def eval_encoder(self):
        """The target encoder, callable for evaluation (features of every patch)."""
        return self.target

    def update_target(self, momentum: float) -> None:
        self.ema.update(momentum)

    # -- checkpoint state (DCP-ready: sharded tensors stay sharded) -------------------

    def state_dict(self) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "target": get_model_state_dict(self.target),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
        }

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state["model"])
        set_model_state_dict(self.target, state["target"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])

    def save_checkpoint(self, checkpointer, step: int, extra: dict):
        """Models, optimizer and ``extra`` (trainer state) into the step directory, with DCP."""
        return checkpointer.save(step, {**self.state_dict(), **extra})

    def load_checkpoint(self, checkpointer, path, extra: dict) -> dict:
        """Load a step directory; ``extra`` names the trainer entries (with placeholder
        values of their types), which come back loaded."""
        state = {**self.state_dict(), **extra}
        checkpointer.load(path, state)
        self.load_state_dict(state)
        return {key: state[key] for key in extra}

    def export_target(self) -> dict[str, torch.Tensor]:
        """Full, unsharded target-encoder weights on the CPU, no wrapper prefixes."""
        return get_model_state_dict(self.target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
