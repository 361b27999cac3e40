"""Typed configuration: dataclasses, YAML presets and dotted command-line overrides.

A run is configured by a preset (``scalejepa/configs/NAME.yaml`` or a path to a YAML
file) plus ``key=value`` overrides (``optim.lr=1e-3``). Every key is checked against the
dataclasses below: an unknown key, a value of the wrong type or a value outside the
allowed choices raises :class:`ConfigError` naming the key and what is allowed, before
any work starts. A config that exists is valid: every section checks its types, choices
and rules when it is built, by :func:`load_config`, directly or by ``dataclasses.replace``
(torchtitan checks each section on construction), and is frozen after. The resolved config
is written into the run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scalejepa.io import atomic_write_text
from scalejepa.preempt import parse_signals
from scalejepa.schema import Checked, Schema, to_plain


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


CONFIG = Schema("config", ConfigError, package="scalejepa.configs", named="preset")


class _Section(Checked):
    """A config section: building one (directly, from YAML or by ``dataclasses.replace``)
    checks every field against its type and choices, then the rules between its fields
    (``_check``), so that a section that exists is valid. ``SECTION``: its key in
    :class:`Config`, for messages."""

    SCHEMA = CONFIG


@dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION = "model"

    # A named size, or custom: the shape given by width, depth, heads and mlp_ratio below.
    arch: Literal[
        "vit_micro", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant", "custom"
    ] = "vit_huge"
    width: int = 0  # model.arch=custom only: encoder width D (a multiple of heads)
    depth: int = 0  # model.arch=custom only: encoder blocks
    heads: int = 0  # model.arch=custom only: attention heads; width / heads must be a multiple of 8
    mlp_ratio: float = 4.0  # model.arch=custom only: MLP hidden width = width x mlp_ratio
    image_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    pred_depth: int = 12
    pred_dim: int = 384
    pred_heads: int = 0  # 0: as many heads as the encoder (the reference's choice)
    # How attention runs: PyTorch SDPA (dense, or padded to the longest sequence when
    # lengths differ), this project's Triton varlen kernel, FlexAttention with a document
    # mask, SDPA on nested jagged tensors (packed),
    # torch.nn.attention.varlen (CUDA, torch >= 2.10), or eager softmax(QK^T)V as the
    # reference code (a baseline for benchmarks). The library paths are kept selectable so
    # that one measured within 3% of triton's speed (benchmarks/attention.py) can take
    # its place (the rule is in that script's docstring).
    attn_impl: Literal["sdpa", "triton", "flex", "eager", "sdpa_nested", "torch_varlen"] = "sdpa"
    # The kernel SDPA may use (attn_impl sdpa, sdpa_nested): auto lets PyTorch pick per call
    # (cuDNN builds a plan per new shape unless TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1); flash
    # has no key mask (padded SDPA needs efficient, cudnn or math); on CPU: flash or math.
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    # How the packed inputs are gathered (the context encoder's kept tokens plus their
    # position embeddings; the predictor's [context ; mask tokens] sequences): PyTorch
    # index ops, or this project's fused Triton kernels. auto: triton with
    # attn_impl=triton, else torch, which is what attn_impl alone chose before this key.
    gather_impl: Literal["auto", "torch", "triton"] = "auto"

    @property
    def gathers(self) -> Literal["torch", "triton"]:
        """The gather kernels that run: ``gather_impl`` with auto resolved."""
        if self.gather_impl != "auto":
            return self.gather_impl
        return "triton" if self.attn_impl == "triton" else "torch"

    def _check(self) -> None:
        """model.arch=custom needs a shape that builds (width a multiple of heads, head
        dimension a multiple of 8, an integer MLP width); named sizes take no shape keys."""
        self._at_least(1, "image_size", "patch_size", "in_chans")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} must be a multiple of "
                              f"model.patch_size={self.patch_size}")
        shape = {"width": self.width, "depth": self.depth, "heads": self.heads}
        if self.arch != "custom":
            given = [k for k, v in shape.items() if v] + (["mlp_ratio"] if self.mlp_ratio != 4.0 else [])
            if given:
                raise ConfigError(
                    f"model.{given[0]} applies to model.arch=custom only (model.arch={self.arch} has a fixed "
                    f"shape): set model.arch=custom or drop model.{given[0]}"
                )
            return
        missing = [k for k, v in shape.items() if v < 1]
        if missing:
            raise ConfigError(f"model.arch=custom needs model.{missing[0]} >= 1 (set model.width, model.depth, "
                              "model.heads)")
        if self.width % self.heads:
            raise ConfigError(
                f"model.width={self.width} is not divisible by model.heads={self.heads}: pick a width that is a "
                f"multiple of the head count"
            )
        head_dim = self.width // self.heads
        if head_dim % 8:
            raise ConfigError(
                f"head dimension model.width / model.heads = {self.width} / {self.heads} = {head_dim} must be a "
                f"multiple of 8 (attention kernels): e.g. "
                f"model.heads={max(1, self.width // (8 * max(1, round(head_dim / 8))))}"
            )
        hidden = self.width * self.mlp_ratio
        if self.mlp_ratio <= 0 or abs(hidden - round(hidden)) > 1e-6:
            raise ConfigError(f"model.mlp_ratio={self.mlp_ratio} must be > 0 and give an integer MLP width "
                              f"(width x mlp_ratio = {hidden})")


@dataclass(frozen=True)
class MaskConfig(_Section):
    SECTION = "mask"

    # reference: the reference code's collator, its quirks included (scalejepa.masks);
    # corrected: independent scale/aspect draws, inclusive offsets, sampled context position.
    mode: Literal["reference", "corrected"] = "reference"
    # truncate: every context cut to the batch minimum (the reference);
    # pack: every image keeps its full context, run as packed variable-length sequences.
    context: Literal["truncate", "pack"] = "truncate"
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False

    def _check(self) -> None:
        for name in ("target_scale", "context_scale", "target_aspect"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"mask.{name}=({lo}, {hi}) must satisfy 0 < low <= high")


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION = "data"

    # Shard directory (with index.json), index.json path, brace URL or comma list.
    # Empty: shards of the built-in set `builtin`, built once into a cache.
    shards: str = ""
    builtin: str = "mnist5k"
    # Images per epoch, for epoch-based schedules and GPU-hours per epoch;
    # 0: the `samples` count of the shards' index.json.
    num_samples: int = 0
    crop_scale: tuple[float, float] = (0.3, 1.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 4
    shuffle_buffer: int = 1000
    # Decode JPEGs at a reduced scale when the crop allows it (Pillow draft mode).
    jpeg_draft: bool = True
    # Random images made on the device instead of shards (benchmarks, smoke runs).
    synthetic: bool = False

    def _check(self) -> None:
        self._at_least(0, "num_workers")


@dataclass(frozen=True)
class OptimConfig(_Section):
    SECTION = "optim"

    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_epochs: float = 40.0
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    ema: tuple[float, float] = (0.996, 1.0)
    clip_grad: float = 0.0  # 0: no clipping (the reference)
    # AdamW's kernels: fused (one kernel per step on CUDA; the CPU keeps the multi-tensor
    # one) or foreach (torch's default multi-tensor AdamW, the reference's).
    implementation: Literal["fused", "foreach"] = "fused"
    # The EMA of the target encoder: one multi-tensor lerp, or the reference code's loop of
    # one update per parameter (for benchmark baselines; backends none and fsdp2).
    ema_impl: Literal["foreach", "loop"] = "foreach"
    # cosine: the reference schedules (cosine LR and weight decay, linear EMA ramp), which
    # depend on the total steps. wsd: warmup-stable-decay, linear warm-up, constant lr,
    # then a linear decay to final_lr over the last decay_fraction of the steps, with a
    # constant weight decay (weight_decay) and a constant EMA momentum (ema[0]): no rule
    # but the decay depends on the total steps, so a shorter run is an exact branch of a
    # longer one up to its decay (scaling-law sweeps, Hägele et al. 2024).
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    # Warm-up length in steps; 0: from warmup_epochs. A fixed count keeps the warm-up of
    # runs of different lengths identical (branched WSD runs need that).
    warmup_steps: int = 0

    def _check(self) -> None:
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
        self._at_least(0, "warmup_steps")


@dataclass(frozen=True)
class TrainConfig(_Section):
    SECTION = "train"

    batch_size: int = 2048  # global, over all ranks and accumulation steps
    epochs: float = 300.0
    # Schedule length in optimizer steps; 0: epochs x steps per epoch.
    steps: int = 0
    # Stop after this many steps (checkpointing first) without changing the schedules; 0: at the end.
    stop_at_step: int = 0
    grad_accum: int = 1
    seed: int = 0
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    log_every: int = 10
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Deterministic kernels (torch.use_deterministic_algorithms): bit-identical reruns and
    # resumes. CPU index backward otherwise sums duplicates in thread order.
    deterministic: bool = False
    # Signals that preempt the run: every rank finishes its step, a checkpoint is committed,
    # the process exits with scalejepa.preempt.PREEMPTED_EXIT_CODE. Comma list; "" for none.
    preempt_signals: str = "SIGTERM,SIGUSR1"

    def _check(self) -> None:
        self._at_least(1, "batch_size", "grad_accum", "log_every")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by "
                              f"train.grad_accum={self.grad_accum}")
        try:
            parse_signals(self.preempt_signals)  # names checked here, before any work
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    SECTION = "checkpoint"

    interval: int = 1000  # steps; 0: only at the end
    keep: int = 3
    async_save: bool = False
    # Weights to start from at step 0, with a fresh optimizer and schedules (--init-from sets
    # it; kept here as the run's record of them): a reference I-JEPA .pth.tar, a run or step
    # directory, an export, a Hugging Face IJepaModel or timm directory (scalejepa.init_from).
    init_from: str = ""

    def _check(self) -> None:
        self._at_least(1, "keep")


@dataclass(frozen=True)
class DistributedConfig(_Section):
    SECTION = "distributed"

    backend: Literal["none", "fsdp2", "deepspeed"] = "none"
    # FSDP2
    param_dtype: Literal["bf16", "fp32"] = "bf16"
    reduce_dtype: Literal["bf16", "fp32"] = "fp32"
    reshard_after_forward: bool = True
    # Hybrid sharding: shard within groups of this many ranks, replicate across them
    # (set to the GPUs per node); 0: shard over all ranks.
    shard_group_size: int = 0
    activation_checkpointing: bool = False
    compile: bool = False
    # torch.compile backend of every block: inductor (generated, fused kernels); aot_eager
    # traces forward and backward without generating code (fast to build: tests, debugging).
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    # DeepSpeed
    zero_stage: Literal[1, 2, 3] = 2


@dataclass(frozen=True)
class EvalConfig(_Section):
    SECTION = "eval"

    knn_every: int = 0  # steps; 0: off
    knn_train_shards: str = ""
    knn_val_shards: str = ""
    knn_k: int = 20

    def _check(self) -> None:
        if self.knn_every and not (self.knn_train_shards and self.knn_val_shards):
            raise ConfigError(
                f"eval.knn_every={self.knn_every} needs eval.knn_train_shards and eval.knn_val_shards "
                "(labeled shard sets, e.g. builtin:mnist5k:train and builtin:mnist5k:val)"
            )


@dataclass(frozen=True)
class ProfileConfig(_Section):
    SECTION = "profile"

    # A torch.profiler trace of `steps` optimizer steps from step `start` (0-based), one
    # per rank in RUN/profile/ (TensorBoard's profiler plugin and Perfetto read it).
    enabled: bool = False
    start: int = 2  # after the first steps' one-off costs (allocations, autotuning)
    steps: int = 3

    def _check(self) -> None:
        self._at_least(0, "start")
        self._at_least(1, "steps")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if not isinstance(section, f.default_factory):
                raise TypeError(f"Config.{f.name} must be a {f.default_factory.__name__}, got {section!r}")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# ----------------------------------------------------------------------------- presets


preset_names = CONFIG.names  # the shipped presets (scalejepa/configs/*.yaml)
preset_path = CONFIG.path  # a preset's name (debug_cpu) or a path to a YAML file -> its path


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset + dotted overrides -> a :class:`Config` (valid: its sections check themselves)."""
    path = preset_path(name_or_path)
    raw = CONFIG.read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    node = raw.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"{section!r} must be a section, not {node!r}")
    node[name] = value


def from_dict(raw: dict[str, Any]) -> Config:
    return CONFIG.build(Config, raw)


PRESET_HEADER = "# preset: "  # config.yaml's first line: the preset (or YAML file) the config came from


def config_yaml(config: Config, preset: str = "") -> str:
    header = f"{PRESET_HEADER}{preset}\n" if preset else ""
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: Config, path: str | Path, preset: str = "") -> None:
    atomic_write_text(path, config_yaml(config, preset))


def preset_of(config_file: str | Path) -> str | None:
    """The preset a saved config names on its first line, if any."""
    first = Path(config_file).read_text().partition("\n")[0]
    return first.removeprefix(PRESET_HEADER) if first.startswith(PRESET_HEADER) else None


def divide_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """Per-rank batch; the global batch must split evenly over ranks and micro-batches."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by world size x train.grad_accum = "
            f"{world_size} x {grad_accum}: pick a batch size that is a multiple of {world_size * grad_accum}"
        )
    return global_batch // world_size
