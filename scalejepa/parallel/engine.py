"""The training engine: one I-JEPA step on whatever the models were wrapped in.

The loop (``scalejepa.train``) and the benchmarks talk only to the :class:`Engine`
protocol, so the single-device, FSDP2 and DeepSpeed paths differ in how the models were
wrapped (``scalejepa.parallel.build_engine``), not in the loop. :class:`TorchEngine` serves
plain modules and FSDP2-sharded ones (a torch optimizer, DCP state);
``scalejepa.parallel.deepspeed.ZeroEngine`` serves DeepSpeed ZeRO.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.profiler import record_function

from scalejepa.ema import EMA
from scalejepa.ijepa import IJEPA, compute_targets
from scalejepa.layout import MODEL_KEY, OPTIM_KEY, TARGET_KEY
from scalejepa.masks import MaskBatch
from scalejepa.models.vit import VisionTransformer

# torch.profiler labels of a micro-batch's phases (the step labels the others).
PHASE_TARGET_FORWARD = "scalejepa/target_forward"
PHASE_CONTEXT_PREDICTOR = "scalejepa/context_predictor"
PHASE_BACKWARD = "scalejepa/backward"


class Engine(Protocol):
    """What the loop, the checkpointer, evaluation and the benchmarks call."""

    model: IJEPA  # the trained module (context encoder + predictor), as wrapped
    target: nn.Module  # the target encoder, as wrapped
    device: torch.device
    last_targets: torch.Tensor | None  # the last kept batch's targets (collapse monitors)
    writes_own_files: bool  # True: a checkpoint format of its own besides DCP (no async saves)

    def forward_backward(self, images: torch.Tensor, masks: MaskBatch, loss_scale: float = 1.0,
                         keep_targets: bool = False) -> torch.Tensor:
        """Targets, loss, backward of one micro-batch; returns the detached loss."""

    def step(self, lr: float, weight_decay: float) -> torch.Tensor | None:
        """Optimizer step with the scheduled values; the grad norm when clipping."""

    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * context encoder."""

    @property
    def eval_encoder(self) -> nn.Module:
        """The target encoder, callable for evaluation (features of every patch)."""

    def checkpoint_state(self) -> dict[str, Stateful]:
        """The engine's entries of a DCP checkpoint (sharded tensors stay sharded)."""

    def save_files(self, step_dir: Path) -> None:
        """Write the engine's own checkpoint files (a no-op for DCP-only engines)."""

    def load_files(self, step_dir: Path) -> None:
        """Load what :meth:`save_files` wrote."""

    def export_target(self) -> dict[str, torch.Tensor]:
        """Full, unsharded target-encoder weights on the CPU (on rank 0), no prefixes."""

    @property
    def implementation(self) -> dict[str, str]:
        """How the optimizer step and the EMA run, for reports and benchmarks:
        ``{"optimizer": ..., "ema": ...}``."""


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only: biases and 1-D parameters (norms) are excluded."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW on the (wrapped) parameters; fused on CUDA unless ``optim.implementation=foreach``."""
    return torch.optim.AdamW(
        param_groups(model),
        lr=optim_config.lr,
        betas=optim_config.betas,
        eps=optim_config.eps,
        fused=optim_config.implementation == "fused" and device.type == "cuda",
    )


def materialize(device: torch.device, *modules: nn.Module) -> bool:
    """Give modules built on the meta device (``build_engine(meta_init=True)``) empty
    storage on ``device``; modules with real weights are left as they are. True when
    something was materialised.

    FSDP2-sharded modules take ``to_empty`` (FSDP2's deferred-initialisation path). Plain
    modules get new tensors in place of the meta ones: ``to_empty`` would try to swap the
    fake meta tensors of a planner trace in place, which fake tensors refuse."""
    meta = [m for m in modules if any(p.is_meta for p in m.parameters())]
    for module in meta:
        if isinstance(module, FSDPModule):
            module.to_empty(device=device)
            continue
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
            for name, buffer in sub.named_buffers(recurse=False):
                sub._buffers[name] = torch.empty_like(buffer, device=device)
    return bool(meta)


def optimizer_description(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    mode = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "torch default: foreach on CUDA"
    return f"{type(optimizer).__name__} ({mode})"


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's learning rate, and weight decay on the groups that take it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd"):
            group["weight_decay"] = weight_decay


class ModelState(Stateful):
    """A module's weights for DCP: sharded stays sharded, names without wrapper prefixes."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.module, state)


class OptimizerState(Stateful):
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.module, self.optimizer, state)


class TorchEngine:
    """Plain PyTorch modules (one device) or FSDP2-sharded ones: a torch optimizer."""

    writes_own_files = False

    def __init__(self, model: IJEPA, target: VisionTransformer, optimizer: torch.optim.Optimizer, *,
                 autocast_dtype: torch.dtype | None, clip_grad: float = 0.0, ema_foreach: bool = True):
        self.model = model
        self.target = target
        self.optimizer = optimizer
        self.autocast_dtype = autocast_dtype
        self.clip_grad = clip_grad
        self.ema = EMA(target, model.encoder, foreach=ema_foreach)
        self.device = next(model.parameters()).device
        self.last_targets: torch.Tensor | None = None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, images: torch.Tensor, masks: MaskBatch, loss_scale: float = 1.0,
                         keep_targets: bool = False) -> torch.Tensor:
        """``keep_targets`` keeps this batch's targets in ``last_targets`` (else it is
        cleared, freeing the memory)."""
        with self._autocast():
            with record_function(PHASE_TARGET_FORWARD):
                targets = compute_targets(self.target, images, masks)
            with record_function(PHASE_CONTEXT_PREDICTOR):
                loss = self.model(images, masks, targets)
        self.last_targets = targets if keep_targets else None
        with record_function(PHASE_BACKWARD):
            (loss * loss_scale).backward()
        return loss.detach()

    def step(self, lr: float, weight_decay: float) -> torch.Tensor | None:
        set_schedule(self.optimizer, lr, weight_decay)
        grad_norm = None
        if self.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def eval_encoder(self) -> nn.Module:
        return self.target

    def update_target(self, momentum: float) -> None:
        self.ema.update(momentum)

    def checkpoint_state(self) -> dict[str, Stateful]:
        return {MODEL_KEY: ModelState(self.model), TARGET_KEY: ModelState(self.target),
                OPTIM_KEY: OptimizerState(self.model, self.optimizer)}

    def save_files(self, step_dir: Path) -> None:
        pass  # everything is in checkpoint_state()

    def load_files(self, step_dir: Path) -> None:
        pass

    def export_target(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @property
    def implementation(self) -> dict[str, str]:
        return {"optimizer": optimizer_description(self.optimizer),
                "ema": "foreach lerp" if self.ema.foreach else "per-parameter loop"}
