"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for I-JEPA.

Layout: ``fully_shard`` on every transformer block, then on the root of the context
encoder, of the predictor and of the target encoder, then on the I-JEPA wrapper (one root
for the trained models). The target encoder is sharded exactly like the context encoder
(same mesh, same groups, same dim-0 placement), so a rank's target shards line up with
its context-encoder shards and the EMA is one multi-tensor lerp of local shards
(``scalejepa.ema``), without communication.

Mesh: 1-D over all ranks (FSDP), or 2-D ``(replicate, shard)`` when
``distributed.shard_group_size`` is set (HSDP: shard within a node, replicate across
nodes; gradients reduce-scatter within the group and all-reduce across groups).

Precision (no double casting):

* ``train.precision`` resolves to fp32 (the default on CPU): no mixed precision at all.
* bf16 with ``distributed.param_dtype=bf16`` (the default): ``MixedPrecisionPolicy``
  all-gathers bf16 parameters and runs the blocks in bf16; gradients are reduced in
  ``distributed.reduce_dtype`` (fp32 by default); sharded parameters and the optimizer
  stay fp32. No ``torch.autocast`` on top. The target encoder's output comes back in fp32
  (``output_dtype``) so the targets' extra LayerNorm runs in fp32; the trained root
  does not cast its inputs, so the targets reach the loss unrounded.
* bf16 with ``distributed.param_dtype=fp32``: fp32 all-gathers and ``torch.autocast``
  bf16, the reference's numerics (twice the all-gather traffic).

Initialisation: the models are built on the CPU from ``train.seed`` on every rank, then
sharded (``fully_shard`` moves each group to the device as it shards it), so a run on any
world size starts from the weights of a one-process run. For ViT-G (2.05 B parameters with
the target copy) this costs each rank ~8 GiB of host memory for a moment (64 GiB on an
8-GPU node) and ~35 s of CPU init (measured on 2 busy cores). A meta-device build with a
per-shard init would avoid both, at the price of weights that differ from a one-process run.
"""

from __future__ import annotations

import logging

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from scalejepa.config import Config, ConfigError
from scalejepa.dist_env import DistEnv, ensure_process_group
from scalejepa.ijepa import IJEPA
from scalejepa.models.vit import VisionTransformer
from scalejepa.parallel.engine import TorchEngine, build_optimizer, materialize
from scalejepa.parallel.precision import autocast_dtype, resolve_dtype

log = logging.getLogger(__name__)


def build_mesh(env: DistEnv, shard_group_size: int) -> DeviceMesh:
    with unset_fake_temporarily():  # a mesh needs real tensors, also when scalejepa.plan traces under fake mode
        return _build_mesh(env, shard_group_size)


def _build_mesh(env: DistEnv, shard_group_size: int) -> DeviceMesh:
    world = env.world_size
    if shard_group_size in (0, world):
        return init_device_mesh(env.device.type, (world,), mesh_dim_names=("shard",))
    if shard_group_size < 0 or world % shard_group_size:
        raise ConfigError(
            f"distributed.shard_group_size={shard_group_size} must divide the world size {world} "
            "(set it to the GPUs per node for HSDP, or 0 to shard over all ranks)"
        )
    return init_device_mesh(env.device.type, (world // shard_group_size, shard_group_size),
                            mesh_dim_names=("replicate", "shard"))


def mixed_precision(config: Config, compute_dtype: torch.dtype | None) -> tuple[dict, torch.dtype | None]:
    """(MixedPrecisionPolicy kwargs, autocast dtype) for the resolved compute dtype."""
    d = config.distributed
    if compute_dtype is None:  # fp32 throughout
        return {}, None
    reduce_dtype = resolve_dtype(d.reduce_dtype)
    if d.param_dtype == "bf16":
        return {"param_dtype": torch.bfloat16, "reduce_dtype": reduce_dtype}, None
    return {"reduce_dtype": reduce_dtype}, compute_dtype


def _reshard_after_forward(module, args, output):
    module.reshard()


def shard(model, target, mesh: DeviceMesh, mp: dict, reshard_after_forward: bool) -> None:
    """fully_shard the blocks, the encoders' and predictor's roots and the I-JEPA root."""
    policy = MixedPrecisionPolicy(**mp)
    for block in [*model.encoder.blocks, *model.predictor.predictor_blocks]:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model.encoder, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model.predictor, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(**mp, cast_forward_inputs=False))

    # The target runs forward only: always reshard (keeping it unsharded would hold a
    # full copy). FSDP2 keeps a root's parameters unsharded after forward (they would be
    # needed at once in backward); the target has no backward, and the EMA must see the
    # sharded parameters, so its root reshards in a hook after every forward.
    for block in target.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    target_policy = MixedPrecisionPolicy(**mp, output_dtype=torch.float32 if mp.get("param_dtype") else None)
    fully_shard(target, mesh=mesh, mp_policy=target_policy, reshard_after_forward=True)
    target.register_forward_hook(_reshard_after_forward)


def wrap_fsdp2(config: Config, env: DistEnv, model: IJEPA, target: VisionTransformer) -> TorchEngine:
    ensure_process_group(env)
    d = config.distributed
    mesh = build_mesh(env, d.shard_group_size)
    mp, autocast = mixed_precision(config, autocast_dtype(config, env.device))
    shard(model, target, mesh, mp, d.reshard_after_forward)
    materialize(env.device, model, target)
    if env.is_main:
        log.info("FSDP2 over mesh %s, mixed precision %s, autocast %s, reshard_after_forward %s, "
                 "activation checkpointing %s, compile %s", dict(zip(mesh.mesh_dim_names, mesh.shape)),
                 mp or "off", autocast, d.reshard_after_forward, d.activation_checkpointing, d.compile)
    optimizer = build_optimizer(model, config.optim, env.device)
    return TorchEngine(model, target, optimizer, autocast_dtype=autocast, clip_grad=config.optim.clip_grad,
                       ema_foreach=config.optim.ema_impl == "foreach")
