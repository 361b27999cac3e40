"""Vision Transformer encoder on packed token sets.

Single-device model code: parallelism (FSDP2, DeepSpeed, checkpointing, compile) is
applied from outside by `scalejepa.parallel`. Parameter names follow the reference
I-JEPA (and timm) so its checkpoints load after stripping wrapper prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scalejepa import kernels
from scalejepa.config import ModelConfig

from .init import init_vit_weights
from .layers import Block, PatchEmbed, Seqs, prepare_layout, sincos_pos_embed_2d


@dataclass(frozen=True)
class VitSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int


VIT_SIZES: dict[str, VitSize] = {
    # A debug size that trains in minutes on two CPU cores.
    "vit_micro": VitSize(128, 4, 4, 512),
    "vit_tiny": VitSize(192, 12, 3, 768),
    "vit_small": VitSize(384, 12, 6, 1536),
    "vit_base": VitSize(768, 12, 12, 3072),
    "vit_large": VitSize(1024, 24, 16, 4096),
    "vit_huge": VitSize(1280, 32, 16, 5120),
    "vit_giant": VitSize(1408, 40, 16, 6144),  # MLP ratio 48/11, as the reference's "giant"
}
GATHER_IMPLS = ("torch", "triton")


def model_size(config: ModelConfig) -> VitSize:
    """The encoder shape of a model config: a named size, or model.arch=custom's shape
    (which the config checked when it was built)."""
    if config.arch != "custom":
        return VIT_SIZES[config.arch]
    return VitSize(config.width, config.depth, config.heads, round(config.width * config.mlp_ratio))


class TokenSelection:
    """Which patch tokens of each image go in: packed patch indices + their layout."""

    def __init__(self, index: torch.Tensor, seqs: Seqs):
        self.index = index  # (T,) int64, patch index within its own image
        self.seqs = seqs  # one sequence per image


class VisionTransformer(nn.Module):
    def __init__(
        self,
        arch: str = "vit_base",
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        attn_impl: str = "sdpa",
        size: VitSize | None = None,
        sdpa_backend: str = "auto",
        gather_impl: str = "torch",
    ):
        """``size``: the shape of a custom architecture (``model_size``); default: the named size ``arch``.
        ``attn_impl``, ``sdpa_backend``: how attention runs (``layers.attention.attend``);
        ``gather_impl``: how the kept tokens are gathered (``gather_with_pos``)."""
        super().__init__()
        if size is None:
            if arch not in VIT_SIZES:
                raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(VIT_SIZES)}")
            size = VIT_SIZES[arch]
        self.arch = arch
        self.embed_dim = size.embed_dim
        self.num_heads = size.num_heads
        self.attn_impl = attn_impl
        if gather_impl not in GATHER_IMPLS:
            raise ValueError(f"unknown gather implementation {gather_impl!r}; choose one of {', '.join(GATHER_IMPLS)}")
        self.gather_impl = gather_impl
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, size.embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.register_buffer("pos_embed", torch.zeros(1, self.num_patches, size.embed_dim))
        self.blocks = nn.ModuleList(
            Block(size.embed_dim, size.num_heads, size.mlp_hidden_dim, attn_impl, sdpa_backend)
            for _ in range(size.depth)
        )
        self.norm = nn.LayerNorm(size.embed_dim, eps=1e-6)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise in place; also the path for models built on the meta device."""
        pos = sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size)
        self.pos_embed.copy_(pos.unsqueeze(0))
        init_vit_weights(self)

    def forward(self, images: torch.Tensor, keep: TokenSelection | None = None) -> torch.Tensor:
        """Encode the kept patch tokens (all of them if ``keep`` is None).

        Returns packed tokens (T, D) after the final LayerNorm, in ``keep``'s layout, or
        (B * N, D) for all patches.
        """
        x = self.patch_embed(images)
        batch, num_patches, dim = x.shape
        if keep is None:
            x = (x + self.pos_embed).reshape(batch * num_patches, dim)
            seqs = Seqs.uniform(batch, num_patches, x.device)
        else:
            x = gather_with_pos(x, keep, self.pos_embed[0], self.gather_impl)
            seqs = keep.seqs
        prepare_layout(seqs, x.shape[0], self.attn_impl)
        for block in self.blocks:
            x = block(x, seqs)
        return self.norm(x)

    # -- evaluation API (timm-style) --------------------------------------------------

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All patch tokens after the final norm: (B, N, D)."""
        return self.forward(images).view(images.shape[0], self.num_patches, self.embed_dim)

    def forward_pooled(self, images: torch.Tensor, last_n: int = 1) -> torch.Tensor:
        """Average-pooled patch tokens of the last ``last_n`` blocks, concatenated (the
        paper's linear-probe features). Intermediate blocks are normed with the final
        LayerNorm, as for the last one."""
        batch = images.shape[0]
        x = self.patch_embed(images)
        x = (x + self.pos_embed).reshape(batch * self.num_patches, self.embed_dim)
        seqs = Seqs.uniform(batch, self.num_patches, x.device)
        prepare_layout(seqs, x.shape[0], self.attn_impl)
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x, seqs)
            if i >= len(self.blocks) - last_n:
                pooled.append(self.norm(x).view(batch, self.num_patches, -1).mean(1))
        return torch.cat(pooled, dim=1)


def gather_with_pos(x: torch.Tensor, keep: TokenSelection, pos_embed: torch.Tensor, impl: str) -> torch.Tensor:
    """Kept tokens of each image, packed, with their position embeddings added; ``impl``
    (``GATHER_IMPLS``): PyTorch index ops, or the fused Triton kernel.

    The sum is in the promoted dtype, as ``x + pos_embed`` is for all patches: under bf16
    autocast (bf16 patch tokens, fp32 buffer) the residual stream starts in fp32 in both
    encoders, so the context encoder computes what the target encoder does on its tokens."""
    dtype = torch.promote_types(x.dtype, pos_embed.dtype)
    x, pos_embed = x.to(dtype), pos_embed.to(dtype)
    if impl == "triton":
        return kernels.gather_tokens(x, keep.index, keep.seqs.cu_seqlens, pos_embed, validate=False)
    return kernels.gather_tokens_reference(x, keep.index, keep.seqs.cu_seqlens, pos_embed)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
