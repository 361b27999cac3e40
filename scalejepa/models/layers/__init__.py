from .attention import Attention, prepare_layout
from .block import Block
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .pos_embed import sincos_pos_embed_2d
from .seqs import Seqs

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "Seqs", "prepare_layout", "sincos_pos_embed_2d"]
