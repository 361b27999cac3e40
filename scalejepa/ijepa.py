"""I-JEPA: context encoder + predictor (trained), target encoder (EMA), loss."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from scalejepa.config import ModelConfig
from scalejepa.masks import MaskBatch
from scalejepa.models.predictor import Predictor
from scalejepa.models.vit import VisionTransformer, model_size


def jepa_loss(predictions: torch.Tensor, targets: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Mean over all elements; smooth L1 (beta 1) as the reference code, or L2 as the paper."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(predictions.float(), targets.float())
    if kind == "l2":
        return F.mse_loss(predictions.float(), targets.float())
    raise ValueError(f"unknown loss {kind!r}; choose smooth_l1 or l2")


class IJEPA(nn.Module):
    """The trained part. ``forward`` returns the loss for given targets."""

    def __init__(self, encoder: VisionTransformer, predictor: Predictor, loss: str = "smooth_l1"):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.loss = loss

    def forward(self, images: torch.Tensor, masks: MaskBatch, targets: torch.Tensor) -> torch.Tensor:
        context = self.encoder(images, masks.context)
        return jepa_loss(self.predictor(context, masks), targets, self.loss)


@torch.no_grad()
def compute_targets(target_encoder: VisionTransformer, images: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
    """Target-encoder features of every patch, layer-normed once more without affine
    parameters, at the target blocks' patches: (T_tgt, D), rows as ``masks.target_index``."""
    features = target_encoder(images)
    features = F.layer_norm(features, features.shape[-1:])
    return features.index_select(0, masks.target_flat)


def build_encoder(config: ModelConfig) -> VisionTransformer:
    return VisionTransformer(config.arch, config.image_size, config.patch_size, config.in_chans, config.attn_impl,
                             size=model_size(config), sdpa_backend=config.sdpa_backend, gather_impl=config.gathers)


def build_models(config: ModelConfig, loss: str = "smooth_l1") -> tuple[IJEPA, VisionTransformer]:
    """(trainable I-JEPA, target encoder); the target starts as a copy of the context encoder."""
    encoder = build_encoder(config)
    predictor = Predictor(
        num_patches=encoder.num_patches,
        embed_dim=encoder.embed_dim,
        pred_dim=config.pred_dim,
        depth=config.pred_depth,
        num_heads=config.pred_heads or encoder.num_heads,
        attn_impl=config.attn_impl,
        sdpa_backend=config.sdpa_backend,
        gather_impl=config.gathers,
    )
    target = copy.deepcopy(encoder)
    target.requires_grad_(False)
    return IJEPA(encoder, predictor, loss), target
