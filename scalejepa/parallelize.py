"""Builds the models and wraps them for the configured backend, from outside the model
code (torchtitan's `parallelize.py` pattern): ``distributed.backend`` none (one device),
fsdp2 (`scalejepa.parallel.fsdp`) or deepspeed (`scalejepa.parallel.deepspeed`)."""

from __future__ import annotations

import os

import torch

from scalejepa.config import Config, ConfigError
from scalejepa.dist_env import DistEnv
from scalejepa.engine import TorchEngine, build_optimizer
from scalejepa.ijepa import build_models
from scalejepa.parallel import apply_block_options


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def check_device_support(config: Config, device: torch.device) -> None:
    if config.model.attn_impl == "flex" and device.type == "cpu":
        raise ConfigError("model.attn_impl=flex cannot train on CPU (FlexAttention has no CPU backward): use sdpa")
    if config.model.attn_impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "model.attn_impl=triton on CPU needs the Triton interpreter (TRITON_INTERPRET=1, slow; for tests): use sdpa"
        )


def build_engine(config: Config, env: DistEnv):
    check_device_support(config, env.device)
    backend = config.distributed.backend
    if backend == "none":
        if env.world_size > 1:
            raise ConfigError(
                f"launched with {env.world_size} processes but distributed.backend=none: "
                "set distributed.backend=fsdp2 or deepspeed, or launch one process"
            )
        torch.manual_seed(config.train.seed)
        model, target = build_models(config.model, config.train.loss)
        model.to(env.device)
        target.to(env.device)
        apply_block_options(model, target, activation_checkpointing=config.distributed.activation_checkpointing,
                            compile=config.distributed.compile)
        optimizer = build_optimizer(model, config.optim, env.device)
        return TorchEngine(
            model, target, optimizer, autocast_dtype=autocast_dtype(config, env.device), clip_grad=config.optim.clip_grad
        )
    if backend == "fsdp2":
        from scalejepa.parallel.fsdp import build_fsdp_engine

        return build_fsdp_engine(config, env, autocast_dtype(config, env.device))
    if backend == "deepspeed":
        from scalejepa.parallel.deepspeed import build_deepspeed_engine

        return build_deepspeed_engine(config, env, autocast_dtype(config, env.device))
    raise ConfigError(f"unknown distributed.backend={backend!r}; choose none, fsdp2 or deepspeed")
