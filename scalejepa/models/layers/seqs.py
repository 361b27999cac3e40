"""Layout of packed token sets: the one description every attention path consumes.

Tokens travel through the encoders and the predictor as one packed ``(T, D)`` tensor of
S sequences laid end to end; ``cu_seqlens`` holds the S + 1 offsets. When all sequences
have the same length (the target encoder, truncated contexts) ``uniform_len`` is set and
attention can run on a dense ``(S, L)`` view with no padding at all. Derived index
tensors (padding map, FlexAttention block mask) are built once per batch, before the first
block runs (``attention.prepare_layout``: outside any compiled block, whose guards would
otherwise see the cache change between blocks), and shared by every layer. Nothing here
syncs with the device: lengths known on the host come in from the mask collator.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Seqs:
    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, uniform_len: int | None = None):
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(max_seqlen)
        self.num_seqs = cu_seqlens.numel() - 1
        self.uniform_len = uniform_len
        self._cache: dict[str, object] = {}

    @classmethod
    def uniform(cls, num_seqs: int, length: int, device: torch.device | str = "cpu") -> "Seqs":
        cu = torch.arange(0, (num_seqs + 1) * length, length, dtype=torch.int32, device=device)
        return cls(cu, length, uniform_len=length)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str = "cpu") -> "Seqs":
        lengths = [int(n) for n in lengths]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        uniform = lengths[0] if lengths and all(n == lengths[0] for n in lengths) else None
        return cls(cu.to(device), max(lengths, default=0), uniform_len=uniform)

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def to(self, device: torch.device | str) -> "Seqs":
        return Seqs(self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen, self.uniform_len)

    def token_seq_ids(self, total: int) -> torch.Tensor:
        """(T,) index of the sequence each packed token belongs to."""
        if "seq_ids" not in self._cache:  # one layout, one total: the key needs no size
            lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
            seq = torch.arange(self.num_seqs, device=self.device)
            self._cache["seq_ids"] = torch.repeat_interleave(seq, lengths, output_size=total)
        return self._cache["seq_ids"]

    def padding(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row of each token in a (S * max_seqlen) padded layout, and the (S, max_seqlen)
        key mask (True where a real token sits)."""
        if "pad" not in self._cache:
            seq = self.token_seq_ids(total)
            pos = torch.arange(total, device=self.device) - self.cu_seqlens.long()[seq]
            lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
            keep = torch.arange(self.max_seqlen, device=self.device) < lengths[:, None]
            self._cache["pad"] = (seq * self.max_seqlen + pos, keep)
        return self._cache["pad"]

    def cached(self, key: str, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def __repr__(self) -> str:
        kind = f"uniform_len={self.uniform_len}" if self.uniform_len is not None else f"max_seqlen={self.max_seqlen}"
        return f"Seqs(num_seqs={self.num_seqs}, {kind})"
