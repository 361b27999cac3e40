"""Builds the models once and hands them to the configured backend to wrap, from outside
the model code (torchtitan's ``parallelize_*`` pattern): ``distributed.backend`` none (one
device), fsdp2 (:mod:`scalejepa.parallel.fsdp`) or deepspeed
(:mod:`scalejepa.parallel.deepspeed`).

The sequence is the same for every backend: seed, build the models on the CPU (so every
world size starts from the weights of a one-process run), load ``--init-from`` weights
into them (still plain modules on the CPU), per-block activation checkpointing and
compile, then the backend's wrapping, which also builds the optimizer on the wrapped
parameters.

``scalejepa.plan`` builds the same engine with ``meta_init=True`` under a
``FakeTensorMode``: the models are built on the meta device, wrapped, then given empty
(fake) storage on the device by :func:`materialize` before the optimizer is built. No
value is ever read, so no initialisation runs."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from scalejepa.config import Config, ConfigError
from scalejepa.dist_env import DistEnv
from scalejepa.ijepa import IJEPA, build_models
from scalejepa.init_from import InitWeights
from scalejepa.models.vit import VisionTransformer
from scalejepa.parallel.blocks import apply_block_options
from scalejepa.parallel.deepspeed import wrap_deepspeed
from scalejepa.parallel.engine import Engine, TorchEngine, build_optimizer, materialize
from scalejepa.parallel.fsdp import wrap_fsdp2
from scalejepa.parallel.precision import autocast_dtype


def check_device_support(config: Config, device: torch.device) -> None:
    impl, sdpa_backend = config.model.attn_impl, config.model.sdpa_backend
    if impl == "flex" and device.type == "cpu":
        raise ConfigError("model.attn_impl=flex cannot train on CPU (FlexAttention has no CPU backward): use sdpa")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        for key, value, instead in (("attn_impl", impl, "sdpa"), ("gather_impl", config.model.gathers, "torch")):
            if value == "triton":
                raise ConfigError(f"model.{key}=triton on CPU needs the Triton interpreter (TRITON_INTERPRET=1, slow; "
                                  f"for tests): use model.{key}={instead}")
    if impl == "torch_varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            raise ConfigError(f"model.attn_impl=torch_varlen needs torch >= 2.10 (this is {torch.__version__}): "
                              "use triton or sdpa")
        if device.type != "cuda":
            raise ConfigError("model.attn_impl=torch_varlen runs FlashAttention's CUDA kernel only: on CPU use sdpa")
    if device.type == "cpu" and sdpa_backend in ("efficient", "cudnn"):
        raise ConfigError(f"model.sdpa_backend={sdpa_backend} has no CPU kernel: on CPU use auto, flash or math")


def wrap_single_device(config: Config, env: DistEnv, model: IJEPA, target: VisionTransformer) -> TorchEngine:
    if env.world_size > 1:
        raise ConfigError(
            f"launched with {env.world_size} processes but distributed.backend=none: "
            "set distributed.backend=fsdp2 or deepspeed, or launch one process"
        )
    if not materialize(env.device, model, target):  # a meta build (scalejepa.plan) gets empty storage instead
        model.to(env.device)
        target.to(env.device)
    optimizer = build_optimizer(model, config.optim, env.device)
    return TorchEngine(model, target, optimizer, autocast_dtype=autocast_dtype(config, env.device),
                       clip_grad=config.optim.clip_grad, ema_foreach=config.optim.ema_impl == "foreach")


def build_engine(config: Config, env: DistEnv, init: InitWeights | None = None, *, meta_init: bool = False) -> Engine:
    """The engine of ``config`` on ``env``. ``init``: weights to start from (checked against
    the config beforehand). ``meta_init``: build on the meta device for a trace under
    ``FakeTensorMode`` (``scalejepa.plan``; no kernel runs, so no device check)."""
    if not meta_init:
        check_device_support(config, env.device)
    backend = config.distributed.backend
    if backend == "none":
        wrap = wrap_single_device
    elif backend == "fsdp2":
        wrap = wrap_fsdp2
    elif backend == "deepspeed":
        wrap = wrap_deepspeed
    else:
        raise ConfigError(f"unknown distributed.backend={backend!r}; choose none, fsdp2 or deepspeed")
    torch.manual_seed(config.train.seed)
    with torch.device("meta") if meta_init else contextlib.nullcontext():
        model, target = build_models(config.model, config.train.loss)  # on the CPU: identical on every rank
    if init is not None:
        init.apply(model, target)
    d = config.distributed
    apply_block_options(model, target, activation_checkpointing=d.activation_checkpointing, compile=d.compile,
                        compile_backend=d.compile_backend)
    return wrap(config, env, model, target)
