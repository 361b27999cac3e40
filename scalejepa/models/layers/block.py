import torch
from torch import nn

from .attention import Attention
from .mlp import Mlp
from .seqs import Seqs


class Block(nn.Module):
    """Pre-LN transformer block on packed tokens (T, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, attn_impl: str = "sdpa",
                 sdpa_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_impl=attn_impl, sdpa_backend=sdpa_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden_dim)

    def forward(self, x: torch.Tensor, seqs: Seqs) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), seqs)
        return x + self.mlp(self.norm2(x))
