from .attention import Attention
from .block import Block
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .pos_embed import sincos_pos_embed_2d
from .seqs import Seqs

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "Seqs", "sincos_pos_embed_2d"]
