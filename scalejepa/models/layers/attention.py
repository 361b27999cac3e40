"""Multi-head self-attention on packed tokens, and the one entry point (`attend`) that
every attention implementation sits behind."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from scalejepa.kernels import varlen_attention

from .seqs import Seqs

ATTN_IMPLS = ("sdpa", "triton", "flex", "eager", "sdpa_nested", "torch_varlen")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Seqs, impl: str = "sdpa",
           sdpa_backend: str = "auto") -> torch.Tensor:
    """Bidirectional attention within each sequence of a packed batch.

    q, k, v: (T, H, hd) -> (T, H, hd). ``impl``: ``sdpa`` (dense when all lengths are equal,
    else padded to the longest sequence with a key mask), ``triton`` (this project's varlen
    kernel), ``flex`` (FlexAttention with a document mask over the packed sequence),
    ``sdpa_nested`` (SDPA on nested jagged tensors: packed, no padding), ``torch_varlen``
    (``torch.nn.attention.varlen``, FlashAttention's varlen kernel; CUDA, torch >= 2.10),
    ``eager`` (softmax(QK^T)V materialised, as the reference code computes it; for baselines).
    ``sdpa_backend`` pins the kernel SDPA may pick (``sdpa``, ``sdpa_nested``); ``auto``
    leaves the choice to PyTorch's dispatcher.
    """
    if impl == "sdpa":
        with sdpa_backend_pinned(sdpa_backend):
            return _padded(q, k, v, seqs, F.scaled_dot_product_attention)
    if impl == "triton":
        # Seqs comes from lengths known on the host: skip the kernel's (syncing) offset check.
        return varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, validate=False)
    if impl == "flex":
        return _flex(q, k, v, seqs)
    if impl == "sdpa_nested":
        with sdpa_backend_pinned(sdpa_backend):
            return _nested(q, k, v, seqs)
    if impl == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn  # here: torch >= 2.10 only

        # Positional: torch 2.10 names the causal switch is_causal, later ones window_size;
        # both default to full (bidirectional) attention.
        return varlen_attn(q, k, v, seqs.cu_seqlens, seqs.cu_seqlens, seqs.max_seqlen, seqs.max_seqlen)
    if impl == "eager":
        return _padded(q, k, v, seqs, _eager_attention)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTN_IMPLS)}")


def sdpa_backend_pinned(name: str):
    """A context in which SDPA may only use backend ``name`` (``auto``: no constraint)."""
    if name == "auto":
        return contextlib.nullcontext()
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if name not in backends:
        raise ValueError(f"unknown SDPA backend {name!r}; choose one of {', '.join(SDPA_BACKENDS)}")
    return sdpa_kernel([backends[name]])


def prepare_layout(seqs: Seqs, total: int, impl: str) -> None:
    """Build the index tensors that ``attend(..., impl)`` reads from ``seqs`` now, before
    the blocks: a compiled block then finds them in the cache (the same guards for every
    block and step) and never builds them itself. ``total``: the packed token count."""
    if impl in ("sdpa", "eager") and seqs.uniform_len is None:
        seqs.padding(total)
    elif impl == "flex":
        _flex_block_mask(seqs, total, seqs.device)


def _eager_attention(q, k, v, attn_mask=None):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _padded(q, k, v, seqs: Seqs, attention) -> torch.Tensor:
    """Dense attention on an (S, H, L, hd) view: directly when all lengths are equal,
    else padded to the longest sequence with a key mask."""
    total, heads, head_dim = q.shape
    # Sizes come from tensor shapes, not from the host ints of ``seqs``: a compiled block
    # sees one symbolic length instead of a new constant (and a recompile) every batch.
    if seqs.uniform_len is not None:
        shape = (seqs.num_seqs, -1, heads, head_dim)
        out = attention(*(t.reshape(shape).transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2).reshape(total, heads, head_dim)
    rows, keep = seqs.padding(total)
    num_seqs, longest = keep.shape
    padded = []
    for t in (q, k, v):
        buf = t.new_zeros(num_seqs * longest, heads, head_dim)
        buf = buf.index_copy(0, rows, t)
        padded.append(buf.view(num_seqs, longest, heads, head_dim).transpose(1, 2))
    out = attention(*padded, attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2).reshape(-1, heads, head_dim).index_select(0, rows)


def _nested(q, k, v, seqs: Seqs) -> torch.Tensor:
    """SDPA on (S, H, j, hd) nested jagged views of the packed tensors (no copies)."""
    # The host lengths stand in for the offsets' min and max, which NJT would read back
    # (a sync); no I-JEPA sequence is empty, so 1 bounds the shortest of non-uniform ones.
    shortest = seqs.uniform_len or 1

    def nest(t):  # NJT SDPA needs contiguous values: q, k, v are strided views of one qkv tensor
        return torch.nested.nested_tensor_from_jagged(t.contiguous(), seqs.cu_seqlens, max_seqlen=seqs.max_seqlen,
                                                      min_seqlen=shortest).transpose(1, 2)

    out = F.scaled_dot_product_attention(nest(q), nest(k), nest(v))
    return out.transpose(1, 2).values()


def _flex_block_mask(seqs: Seqs, total: int, device: torch.device):
    """The document mask of the packed sequence (tokens attend within their own sequence)."""

    def build():
        seq_ids = seqs.token_seq_ids(total)

        def same_sequence(b, h, q_idx, kv_idx):
            return seq_ids[q_idx] == seq_ids[kv_idx]

        return create_block_mask(same_sequence, None, None, total, total, device=device)

    return seqs.cached("flex", build)


def _flex(q, k, v, seqs: Seqs) -> torch.Tensor:
    block_mask = _flex_block_mask(seqs, q.shape[0], q.device)
    out = _flex_fn(q.device)(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=block_mask)
    return out.squeeze(0).transpose(0, 1)


_compiled_flex = None


def _flex_fn(device: torch.device):
    """FlexAttention is only fused when compiled; eager (used on CPU) is a slow reference."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_impl: str = "sdpa", sdpa_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention implementation {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"unknown SDPA backend {sdpa_backend!r}; choose one of {', '.join(SDPA_BACKENDS)}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.sdpa_backend = sdpa_backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seqs: Seqs) -> torch.Tensor:
        total, dim = x.shape
        q, k, v = self.qkv(x).view(total, 3, self.num_heads, dim // self.num_heads).unbind(1)
        out = attend(q, k, v, seqs, self.attn_impl, self.sdpa_backend)
        return self.proj(out.reshape(total, dim))
