"""The I-JEPA predictor: a narrow ViT that predicts target-block representations.

Each (target block m, image b) pair is its own sequence, [context of b ; mask tokens at
the positions of block m], so the context is processed once per target block, as in the
reference. Sequences are packed (s = m * B + b); with truncated contexts they all have
the same length and attention runs dense.
"""

from __future__ import annotations

import torch
from torch import nn

from scalejepa import kernels

from .init import init_vit_weights
from .layers import Block, prepare_layout, sincos_pos_embed_2d
from .vit import GATHER_IMPLS


class Predictor(nn.Module):
    def __init__(
        self,
        num_patches: int,
        embed_dim: int,
        pred_dim: int = 384,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        attn_impl: str = "sdpa",
        sdpa_backend: str = "auto",
        gather_impl: str = "torch",
    ):
        """``attn_impl``, ``sdpa_backend``: how attention runs; ``gather_impl``: how the
        packed [context ; mask tokens] input is built (PyTorch index ops or the fused
        Triton kernel)."""
        super().__init__()
        self.grid_size = int(round(num_patches**0.5))
        if self.grid_size**2 != num_patches:
            raise ValueError(f"the predictor needs a square patch grid, got {num_patches} patches")
        self.pred_dim = pred_dim
        self.attn_impl = attn_impl
        if gather_impl not in GATHER_IMPLS:
            raise ValueError(f"unknown gather implementation {gather_impl!r}; choose one of {', '.join(GATHER_IMPLS)}")
        self.gather_impl = gather_impl
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.register_buffer("predictor_pos_embed", torch.zeros(1, num_patches, pred_dim))
        self.predictor_blocks = nn.ModuleList(
            Block(pred_dim, num_heads, int(pred_dim * mlp_ratio), attn_impl, sdpa_backend) for _ in range(depth)
        )
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.predictor_pos_embed.copy_(sincos_pos_embed_2d(self.pred_dim, self.grid_size).unsqueeze(0))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        init_vit_weights(self)

    def forward(self, context: torch.Tensor, masks) -> torch.Tensor:
        """context: packed context-encoder output (T_ctx, D) in ``masks.context`` layout.
        Returns predictions (T_tgt, D), row-aligned with ``masks.target_index``."""
        x = self.predictor_embed(context)
        # The promoted dtype: under bf16 autocast the residual stream is fp32, as in the
        # reference (its fp32 mask tokens promote the concatenation) and the encoders.
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.mask_token.dtype),
                                    self.predictor_pos_embed.dtype)
        args = (x.to(dtype), masks.context.index, masks.context.seqs.cu_seqlens, masks.target_index,
                masks.target_seqs.cu_seqlens, self.mask_token.view(-1).to(dtype), self.predictor_pos_embed[0].to(dtype))
        # The packed layout (offsets, longest sequence) is known on the host from the
        # collator, masks.predictor_seqs; the builders return the same offsets.
        if self.gather_impl == "triton":
            x, _ = kernels.build_predictor_input(*args, validate=False)
        else:
            x, _ = kernels.build_predictor_input_reference(*args)
        prepare_layout(masks.predictor_seqs, x.shape[0], self.attn_impl)
        for block in self.predictor_blocks:
            x = block(x, masks.predictor_seqs)
        x = self.predictor_norm(x).index_select(0, masks.predictor_target_rows)
        return self.predictor_proj(x)
