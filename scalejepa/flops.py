"""FLOP accounting for one I-JEPA training step, GPU peak throughput, MFU and GPU-hours.

Convention: matmul FLOPs only, 2 FLOPs per multiply-add; a trained part costs forward +
backward = 3 x forward, a frozen part forward only. One
transformer layer of width D and MLP width H on a sequence of n tokens costs
``2 * n * (4 D^2 + 2 D H) + 4 * n^2 * D`` forward (qkv, proj, fc1, fc2; Q K^T and P V),
i.e. ``24 D^2 n + 4 n^2 D`` at MLP ratio 4. Per step:

* target encoder, forward on all N patches of every image (no gradients);
* context encoder, forward + backward on each image's kept context tokens;
* predictor, forward + backward: the input projection on the context tokens, then one
  sequence [context ; target block m] per (image, block), then the output projection on
  the target tokens;
* the patch-embedding convolution runs on all N patches in both encoders; in the context
  encoder its backward computes only the weight gradient (the images need none): 2 x forward.

These are *model* FLOPs, the basis of MFU: work that an implementation adds on top is not
credited, i.e. padding (a padded attention is credited with the real lengths only), the
recomputation of activation checkpointing, and FlashAttention's recomputation of Q K^T in
the backward (``torch.utils.flop_counter`` credits an SDPA backward with 2.5 x its forward,
we count 2 x, as for every other matmul). Elementwise work (LayerNorm, GELU, softmax, the
loss, the optimizer and the EMA) is excluded as well; it is well under 1% of the matmul
FLOPs of a ViT-H step. ``tests/test_flops.py`` checks the count against
``torch.utils.flop_counter.FlopCounterMode`` exactly.

Training logs use :func:`step_flops_per_image` (mean tokens per image and per target block,
which the loop knows from its batches) with :func:`peak_tflops` (``scalejepa.metrics``);
benchmarks use :func:`batch_flops` (exact, from a batch's per-sequence lengths).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from scalejepa.config import Config, ModelConfig
from scalejepa.masks import MaskGenerator, mask_rng
from scalejepa.models.vit import model_size

# The paper's budget (Assran et al., CVPR 2023): ViT-H/14, 300 epochs of ImageNet-1k on
# 16 A100s in under 72 hours.
PAPER_IMAGES_PER_EPOCH = 1_281_167
PAPER_EPOCHS = 300
PAPER_GPUS = 16
PAPER_HOURS = 72.0
PAPER_A100_HOURS = PAPER_GPUS * PAPER_HOURS  # 1152, an upper bound ("under 72 hours")

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s per GPU, from the vendors' data
# sheets. Matched against torch.cuda.get_device_name() by substring, first match wins, so
# the more specific names come first. A GPU not in this table gets a warning and no MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756.0),
    ("H800", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM ("NVIDIA H200")
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),  # SXM4 and PCIe, 40 and 80 GB
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),  # AWS variant of the A10 (lower clocks)
    ("A10", 125.0),
    ("MI300X", 1307.0),
)

_warned: set[str] = set()


# ----------------------------------------------------------------------------- model sizes
@dataclass(frozen=True)
class _Dims:
    dim: int  # encoder width D
    depth: int
    mlp: int  # encoder MLP hidden width
    num_patches: int  # N
    patch_in: int  # C * p * p, inputs per patch
    pred_dim: int
    pred_depth: int
    pred_mlp: int
    pred_heads: int
    heads: int


def _dims(model: ModelConfig) -> _Dims:
    size = model_size(model)
    grid = model.image_size // model.patch_size
    return _Dims(
        dim=size.embed_dim, depth=size.depth, mlp=size.mlp_hidden_dim, num_patches=grid * grid,
        patch_in=model.in_chans * model.patch_size**2, pred_dim=model.pred_dim, pred_depth=model.pred_depth,
        pred_mlp=int(model.pred_dim * 4.0), pred_heads=model.pred_heads or size.num_heads, heads=size.num_heads,
    )


def _model_config(config: Config | ModelConfig) -> ModelConfig:
    return config.model if isinstance(config, Config) else config


def param_counts(config: Config | ModelConfig) -> dict[str, int]:
    """Parameters of the context encoder, the predictor and the target encoder (analytic;
    equal to ``count_parameters`` of the built models, see tests/test_flops.py), and the
    encoder's non-embedding parameters (without the patch embedding; the position
    embedding is a fixed buffer, not a parameter)."""
    d = _dims(_model_config(config))

    def blocks(width: int, hidden: int, depth: int) -> int:
        # norm1, qkv, proj, norm2, fc1, fc2 (weights + biases)
        per = 2 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width
        per += (width * hidden + hidden) + (hidden * width + width)
        return depth * per

    encoder = (d.patch_in * d.dim + d.dim) + blocks(d.dim, d.mlp, d.depth) + 2 * d.dim
    predictor = ((d.dim * d.pred_dim + d.pred_dim) + d.pred_dim + blocks(d.pred_dim, d.pred_mlp, d.pred_depth)
                 + 2 * d.pred_dim + (d.pred_dim * d.dim + d.dim))
    embedding = d.patch_in * d.dim + d.dim
    return {"encoder": encoder, "predictor": predictor, "target": encoder, "trainable": encoder + predictor,
            "encoder_non_embedding": encoder - embedding}


# ----------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step on a batch (all images, not per image)."""

    images: int
    target_encoder: float  # forward
    context_encoder: float  # forward + backward
    predictor: float  # forward + backward
    attention: float  # the part of the three above in Q K^T and P V (fwd and bwd)

    @property
    def total(self) -> float:
        return self.target_encoder + self.context_encoder + self.predictor

    @property
    def per_image(self) -> float:
        return self.total / max(1, self.images)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total, "per_image": self.per_image}


def _layer_linear(n: float, width: int, hidden: int) -> float:
    """Forward FLOPs of qkv, proj, fc1 and fc2 on n tokens."""
    return 2.0 * n * (4 * width * width + 2 * width * hidden)


def _layer_attention(sum_sq: float, width: int) -> float:
    """Forward FLOPs of Q K^T and P V over sequences whose squared lengths sum to sum_sq."""
    return 4.0 * sum_sq * width


def step_flops(config: Config | ModelConfig, context_lens: Sequence[float], target_lens: Sequence[float]) -> StepFlops:
    """Exact FLOPs of one step for given per-image context lengths (B values, after any
    truncation) and target-block lengths (M * B values, block-major: s = m * B + b, as
    ``MaskBatch.target_seqs``). Lengths may be fractional (expected values)."""
    d = _dims(_model_config(config))
    batch = len(context_lens)
    if batch == 0 or len(target_lens) % batch:
        raise ValueError(f"{len(target_lens)} target blocks for {batch} images: need a multiple of the image count")
    ctx = [float(c) for c in context_lens]
    tgt = [float(t) for t in target_lens]
    pred_lens = [ctx[s % batch] + tgt[s] for s in range(len(tgt))]  # [context ; block] per sequence

    patch_embed = 2.0 * batch * d.num_patches * d.patch_in * d.dim
    n_all = batch * d.num_patches
    tgt_attn = d.depth * _layer_attention(batch * d.num_patches**2, d.dim)
    target = patch_embed + d.depth * _layer_linear(n_all, d.dim, d.mlp) + tgt_attn

    ctx_attn = 3.0 * d.depth * _layer_attention(sum(c * c for c in ctx), d.dim)
    context = 2.0 * patch_embed + 3.0 * d.depth * _layer_linear(sum(ctx), d.dim, d.mlp) + ctx_attn

    pred_attn = 3.0 * d.pred_depth * _layer_attention(sum(n * n for n in pred_lens), d.pred_dim)
    predictor = 3.0 * (
        2.0 * sum(ctx) * d.dim * d.pred_dim  # predictor_embed on the context tokens (once, before repeating)
        + d.pred_depth * _layer_linear(sum(pred_lens), d.pred_dim, d.pred_mlp)
        + 2.0 * sum(tgt) * d.pred_dim * d.dim  # predictor_proj on the target tokens
    ) + pred_attn
    return StepFlops(batch, target, context, predictor, tgt_attn + ctx_attn + pred_attn)


def batch_flops(config: Config | ModelConfig, masks) -> StepFlops:
    """Exact FLOPs of one step on a ``MaskBatch`` (reads its offsets: call it on the host
    copy of the masks, the device copy would sync)."""
    ctx = torch.diff(masks.context.seqs.cu_seqlens).tolist()
    tgt = torch.diff(masks.target_seqs.cu_seqlens).tolist()
    return step_flops(config, ctx, tgt)


def step_flops_per_image(config: Config, context_tokens: float, target_tokens: float) -> float:
    """Model FLOPs of one training step per image, for training logs.

    ``context_tokens``: mean context tokens per image after truncation (a batch's
    ``MaskBatch.context_tokens / batch_size``); ``target_tokens``: mean tokens per *target
    block* (``MaskBatch.target_tokens / (batch_size * num_targets)``). Uses the mean length
    for the attention term, which underestimates packed (varied-length) attention by the
    length variance: well under 0.1% of a ViT-H step.
    """
    num_targets = config.mask.num_targets
    return step_flops(config, [context_tokens], [target_tokens] * num_targets).per_image


@dataclass(frozen=True)
class MaskStats:
    batch_size: int
    batches: int
    context_tokens: float  # mean per image, after truncation
    context_sampled: float  # mean per image, before truncation
    target_tokens: float  # mean per target block
    num_targets: int


def mask_stats(config: Config, batch_size: int, batches: int = 8, seed: int = 0) -> MaskStats:
    """Expected token counts at a per-GPU batch size, by drawing ``batches`` mask batches
    (truncation to the batch minimum depends on the batch size: the smallest context of more
    images is smaller)."""
    generator = _mask_generator(config)
    ctx = sampled = tgt = 0
    for i in range(batches):
        m = generator(batch_size, mask_rng(seed, 0, 0, i))
        ctx += m.context_tokens
        sampled += m.context_sampled
        tgt += m.target_tokens
    images = batch_size * batches
    num_targets = config.mask.num_targets
    return MaskStats(batch_size, batches, ctx / images, sampled / images, tgt / (images * num_targets), num_targets)


def _mask_generator(config: Config) -> MaskGenerator:
    return MaskGenerator(config.model.image_size // config.model.patch_size, config.mask)


def expected_flops_per_image(config: Config, batch_size: int, batches: int = 8, seed: int = 0) -> float:
    """Model FLOPs per image of one step at a per-GPU batch size, averaged over sampled
    mask batches (exact per batch, including the attention's length variance)."""
    generator = _mask_generator(config)
    total = sum(batch_flops(config, generator(batch_size, mask_rng(seed, 0, 0, i))).total for i in range(batches))
    return total / (batch_size * batches)


# ----------------------------------------------------------------------------- peak, MFU, hours
def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_tflops_for_name(name: str) -> float | None:
    """Dense bf16 peak of a GPU model name (``torch.cuda.get_device_name``); None with a
    warning (once per name) when the name is not in :data:`PEAK_BF16_TFLOPS`."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"no dense bf16 peak known for GPU {name!r}: MFU is not reported. Add it to "
            "scalejepa.flops.PEAK_BF16_TFLOPS (or pass the peak explicitly) rather than guessing",
            stacklevel=2,
        )
    return None


def peak_tflops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak TFLOP/s of ``device`` (default: the current CUDA device); None on
    CPU (no meaningful peak) and, with a warning, on a GPU not in the table."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device))


def mfu_pct(flops_per_image: float, images_per_sec: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in percent of the dense bf16 peak (per GPU)."""
    if peak is None or peak <= 0:
        return None
    return 100.0 * flops_per_image * images_per_sec / (peak * 1e12)


def gpu_hours(images: float, images_per_sec_per_gpu: float) -> float:
    """GPU-hours to process ``images`` at a per-GPU rate (compute only, perfect scaling)."""
    return images / images_per_sec_per_gpu / 3600.0
