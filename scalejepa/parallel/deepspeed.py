"""DeepSpeed ZeRO (stages 1, 2 and 3) for I-JEPA, behind the same engine interface.

* ``deepspeed.initialize`` wraps the trained I-JEPA (context encoder + predictor) with a
  torch ``AdamW`` on our parameter groups (no weight decay on biases and norms); the
  DeepSpeed config is generated from ours (:func:`deepspeed_config`): micro-batch and
  accumulation from ``train``, bf16 from ``train.precision``, ZeRO stage from
  ``distributed.zero_stage``, clipping from ``optim.clip_grad`` (always written out:
  DeepSpeed's own default is 1.0, the reference does not clip). Our schedules set the
  learning rate and weight decay of the optimizer's groups before every step; DeepSpeed
  gets no scheduler of its own. Passing a torch optimizer also avoids DeepSpeed's
  ``fused_adam`` JIT build.
* Gradient accumulation is DeepSpeed's own (``gradient_accumulation_steps``): every
  micro-batch's ``backward``, ``step`` only at the boundary.
* The target encoder is not trained, so it is not in the training engine, and it stays
  fp32 whatever the training precision (an EMA with momentum >= 0.996 in bf16 would round
  its updates away). ZeRO-1/2 keep the model replicated: the target is a plain fp32 copy
  on every rank, updated from the (replicated) context encoder. ZeRO-3 partitions
  parameters: the target gets a forward-only ZeRO-3 engine of its own (no optimizer,
  nothing persistent), so its partitions (``param.ds_tensor``) have exactly the context
  encoder's layout and the EMA is one multi-tensor lerp of local partitions, no gather.
* Mixed precision: DeepSpeed's ``bf16`` mode (bf16 parameters and compute, fp32 master
  weights in the optimizer, gradients communicated in ``distributed.reduce_dtype``); the
  target runs under ``torch.autocast`` bf16. The EMA reads the context encoder's bf16
  parameters (the rounded fp32 master weights).
* Checkpoints: DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` into the step
  directory's ``deepspeed/`` (same commit marker, pruning and ``--resume auto``), the target
  encoder as a full fp32 state dict (``target_encoder.pt``); the train state goes through
  DCP as for every engine (``scalejepa.checkpoint``).
  DeepSpeed checkpoints resume on the same world size and ZeRO stage only (use
  DeepSpeed's universal-checkpoint conversion, or FSDP2, to change them).

On CPU DeepSpeed uses its CPU accelerator and gloo (``DS_ACCELERATOR=cpu`` is set when no
GPU is visible). Its first start JIT-builds a shared-memory communication op, cached in
``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from scalejepa.checkpoint import CheckpointError
from scalejepa.config import Config, ConfigError
from scalejepa.dist_env import DistEnv, ensure_process_group
from scalejepa.ijepa import IJEPA, compute_targets
from scalejepa.io import atomic_torch_save, atomic_write_text
from scalejepa.layout import DEEPSPEED_META_FILE, DEEPSPEED_SUBDIR, DEEPSPEED_TARGET_FILE
from scalejepa.masks import MaskBatch
from scalejepa.models.vit import VisionTransformer
from scalejepa.parallel.engine import (
    PHASE_BACKWARD,
    PHASE_CONTEXT_PREDICTOR,
    PHASE_TARGET_FORWARD,
    build_optimizer,
    optimizer_description,
    set_schedule,
)
from scalejepa.parallel.precision import autocast_dtype

log = logging.getLogger(__name__)


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:  # optional (the [deepspeed] extra), and DS_ACCELERATOR must be set before it is imported
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            f"distributed.backend=deepspeed needs DeepSpeed: pip install 'scalejepa[deepspeed]' ({exc})"
        ) from None
    if log.getEffectiveLevel() > logging.DEBUG:
        deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_config(config: Config, env: DistEnv, compute_dtype: torch.dtype | None,
                     num_params: int = 500_000_000) -> dict:
    """Our config, written as DeepSpeed's (its keys: deepspeed.ai/docs/config-json)."""
    t, d = config.train, config.distributed
    bucket_size = int(min(500_000_000, max(num_params, 1_000_000)))
    micro_batch = t.batch_size // (env.world_size * t.grad_accum)
    bf16 = compute_dtype == torch.bfloat16
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(config.optim.clip_grad),  # explicit: DeepSpeed's default is 1.0
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_optimization": {
            "stage": d.zero_stage,
            "overlap_comm": env.device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_scatter": True,
            # DeepSpeed's 5e8-element buckets, but never larger than the model: on CPU a
            # bucket costs its full size every step (a ~20x slowdown for a micro model).
            "reduce_bucket_size": bucket_size,
            "allgather_bucket_size": bucket_size,
        },
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        ds["communication_data_type"] = d.reduce_dtype
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def target_config(ds_config: dict) -> dict:
    """The forward-only ZeRO-3 engine of the target encoder: fp32, nothing persistent
    (every parameter lives as its partition between forwards, where the EMA updates it)."""
    return {
        "train_batch_size": ds_config["train_batch_size"],
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }


class ZeroEngine:
    """The :class:`~scalejepa.parallel.engine.Engine` protocol on DeepSpeed ZeRO."""

    writes_own_files = True

    def __init__(self, deepspeed, engine, target: torch.nn.Module, target_engine, *, zero_stage: int,
                 autocast_dtype: torch.dtype | None, input_dtype: torch.dtype, clip_grad: float):
        self.deepspeed = deepspeed
        self.engine = engine
        self.model: IJEPA = engine.module
        self.target = target
        self.target_forward = target_engine if target_engine is not None else target
        self.zero_stage = zero_stage
        self.autocast_dtype = autocast_dtype
        self.input_dtype = input_dtype
        self.clip_grad = clip_grad
        self.device = engine.device
        self.last_targets: torch.Tensor | None = None  # kept on request, for the collapse monitors
        online, tgt = self._local(self.model.encoder), self._local(target)
        if len(online) != len(tgt) or any(a.shape != b.shape for a, b in zip(online, tgt)):
            raise ValueError("target and context encoders must be partitioned alike")

    # -- training -----------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, images: torch.Tensor, masks: MaskBatch, loss_scale: float = 1.0,
                         keep_targets: bool = False) -> torch.Tensor:
        with self._autocast(), record_function(PHASE_TARGET_FORWARD):
            targets = compute_targets(self.target_forward, images, masks)
        self.last_targets = targets if keep_targets else None
        with record_function(PHASE_CONTEXT_PREDICTOR):
            loss = self.engine(images.to(self.input_dtype), masks, targets)
        with record_function(PHASE_BACKWARD):
            # loss_scale is our 1 / grad_accum: DeepSpeed must not divide once more.
            self.engine.backward(loss * loss_scale, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches in step(); no update here
        return loss.detach().float()

    def step(self, lr: float, weight_decay: float):
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed step() called off the gradient-accumulation boundary")
        set_schedule(self.engine.optimizer, lr, weight_decay)
        self.engine.step()
        if self.clip_grad > 0:
            norm = self.engine.get_global_grad_norm()
            return None if norm is None else torch.as_tensor(norm)
        return None

    def _local(self, module: torch.nn.Module) -> list[torch.Tensor]:
        if self.zero_stage == 3:
            return [p.ds_tensor for p in module.parameters()]
        return [p.data for p in module.parameters()]

    @property
    def eval_encoder(self) -> torch.nn.Module:
        """The target encoder, callable for evaluation: under ZeRO-3 its engine, which
        gathers the partitioned parameters around each forward."""
        return self.target_forward

    def update_target(self, momentum: float) -> None:
        """target <- m * target + (1 - m) * context encoder, on local partitions (ZeRO-3)
        or the replicated parameters (ZeRO-1/2): one multi-tensor lerp."""
        target, online = self._local(self.target), self._local(self.model.encoder)
        if online[0].dtype != target[0].dtype:
            online = [o.to(t.dtype) for o, t in zip(online, target)]
        torch._foreach_lerp_(target, online, 1.0 - momentum)

    @property
    def implementation(self) -> dict[str, str]:
        return {"optimizer": f"{optimizer_description(self.engine.optimizer)} under DeepSpeed ZeRO-{self.zero_stage}",
                "ema": "foreach lerp"}

    # -- checkpoints ----------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {}  # DeepSpeed writes the models and optimizer itself (save_files)

    def save_files(self, step_dir: Path) -> None:
        self.engine.save_checkpoint(str(step_dir), tag=DEEPSPEED_SUBDIR, save_latest=False)
        target = self.export_target()
        if dist.get_rank() == 0:
            atomic_torch_save(target, step_dir / DEEPSPEED_TARGET_FILE)
            meta = {"world_size": dist.get_world_size(), "zero_stage": self.zero_stage}
            atomic_write_text(step_dir / DEEPSPEED_META_FILE, json.dumps(meta))

    def load_files(self, step_dir: Path) -> None:
        meta_path = step_dir / DEEPSPEED_META_FILE
        if not meta_path.is_file():
            raise CheckpointError(f"{step_dir} is not a DeepSpeed checkpoint of scalejepa (no {DEEPSPEED_META_FILE}); "
                                  "was it written by another distributed.backend?")
        meta = json.loads(meta_path.read_text())
        world = dist.get_world_size()
        if (meta["world_size"], meta["zero_stage"]) != (world, self.zero_stage):
            raise CheckpointError(
                f"{step_dir} was written by DeepSpeed ZeRO-{meta['zero_stage']} on {meta['world_size']} ranks; this "
                f"run is ZeRO-{self.zero_stage} on {world}. DeepSpeed checkpoints resume on the same world size and "
                "stage (convert them with DeepSpeed's ds_to_universal, or train with distributed.backend=fsdp2, "
                "whose checkpoints reshard)"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(step_dir), tag=DEEPSPEED_SUBDIR, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {step_dir / DEEPSPEED_SUBDIR}")
        self._load_target(step_dir / DEEPSPEED_TARGET_FILE)

    @torch.no_grad()
    def _load_target(self, file: Path) -> None:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if self.zero_stage != 3:
            weights = torch.load(file, map_location="cpu", mmap=True)
            self.target.load_state_dict(weights)
            return
        weights = torch.load(file, map_location="cpu", mmap=True) if dist.get_rank() == 0 else None
        for name, param in self.target.named_parameters():
            with self.deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.get_rank() == 0:
                    param.data.copy_(weights[name])
        for name, buffer in self.target.named_buffers():  # not partitioned: every rank loads
            if weights is None:
                weights = torch.load(file, map_location="cpu", mmap=True)
            buffer.copy_(weights[name])

    @torch.no_grad()
    def export_target(self) -> dict[str, torch.Tensor]:
        """Full fp32 target-encoder weights on the CPU of rank 0 (empty on the others)."""
        main = dist.get_rank() == 0
        out: dict[str, torch.Tensor] = {}
        if self.zero_stage == 3:
            for name, param in self.target.named_parameters():  # one parameter gathered at a time
                with self.deepspeed.zero.GatheredParameters([param]):
                    if main:
                        out[name] = param.data.detach().to("cpu", copy=True)
        else:
            for name, param in self.target.named_parameters():
                if main:
                    out[name] = param.detach().to("cpu", copy=True)
        if main:
            for name, buffer in self.target.named_buffers():
                out[name] = buffer.detach().to("cpu", copy=True)
            # The module's own order (buffers first where the module registers them first).
            order = list(self.target.state_dict().keys())
            out = {k: out[k] for k in order if k in out}
        return out


def wrap_deepspeed(config: Config, env: DistEnv, model: IJEPA, target: VisionTransformer) -> ZeroEngine:
    if config.optim.ema_impl != "foreach":
        raise ConfigError(f"optim.ema_impl={config.optim.ema_impl} is not implemented for DeepSpeed (its EMA is one "
                          "multi-tensor lerp of the partitions): use foreach, or distributed.backend none or fsdp2")
    deepspeed = _import_deepspeed(env.device)
    ensure_process_group(env)
    for name, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(name, str(value))  # DeepSpeed asserts on them; plain `python` sets none
    # DeepSpeed calls collectives that torch deprecates, with a warning per call: not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    d = config.distributed
    if config.checkpoint.async_save and env.is_main:
        log.warning("checkpoint.async_save is not used with DeepSpeed: its checkpoints are written synchronously")
    compute_dtype = autocast_dtype(config, env.device)
    optimizer = build_optimizer(model, config.optim, env.device)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = deepspeed_config(config, env, compute_dtype, num_params)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    target_engine = None
    if d.zero_stage == 3:
        target_engine, _, _, _ = deepspeed.initialize(model=target, config=target_config(ds_config),
                                                      dist_init_required=False)
    else:
        target.to(env.device)
    if env.is_main:
        log.info("DeepSpeed ZeRO-%d, bf16 %s, micro-batch %d x %d accumulation, clipping %s", d.zero_stage,
                 ds_config["bf16"]["enabled"], ds_config["train_micro_batch_size_per_gpu"],
                 ds_config["gradient_accumulation_steps"], ds_config["gradient_clipping"] or "off")
    bf16 = ds_config["bf16"]["enabled"]
    return ZeroEngine(
        deepspeed, engine, target, target_engine, zero_stage=d.zero_stage,
        autocast_dtype=compute_dtype if bf16 else None, input_dtype=torch.bfloat16 if bf16 else torch.float32,
        clip_grad=config.optim.clip_grad,
    )
