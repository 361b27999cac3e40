"""Multi-block masking: one context block and several target blocks per image.

``mode="reference"`` reproduces the collator of the reference code (facebookresearch/ijepa), quirks
included: one uniform number drives both scale and aspect ratio (1), block offsets never
reach the last row and column (2), so on a 16x16 grid the context block is always the
top-left 15x15 square (3); with ``context="truncate"`` every context is cut to the batch
minimum in raster order (4). ``mode="corrected"`` draws scale and aspect independently,
lets blocks reach the last row/column and so samples the context position too.
``context="pack"`` keeps every image's full context; the model runs it as packed
variable-length sequences.

As in the reference, block sizes are drawn once per batch and positions per image; a
context that keeps too few patches is redrawn, and after 20 failed draws the context may
overlap one more target block. Everything is drawn from a generator seeded by
(seed, rank, worker, step), so a batch's masks are reproducible and differ across ranks.
The common path is vectorised over the batch; only redraws loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from scalejepa.config import ConfigError, MaskConfig
from scalejepa.models.layers import Seqs
from scalejepa.models.vit import TokenSelection

_REDRAWS_PER_RELAXATION = 20  # the reference's timeout


def mask_rng(seed: int, rank: int, worker: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, worker, step])


@dataclass
class MaskBatch:
    """Everything the model needs to know about one batch's masks.

    ``context``: kept patch indices of each image, packed (one sequence per image).
    ``target_index``/``target_seqs``: patch indices of the M * B target blocks, packed,
    sequence s = m * B + b. ``target_flat`` indexes the same patches in a (B * N) flat
    token tensor. ``predictor_seqs``/``predictor_target_rows``: the predictor's packed
    layout, [context of b ; target block (m, b)] per sequence, and where the mask tokens sit.
    """

    batch_size: int
    num_targets: int
    num_patches: int
    context: TokenSelection
    target_index: torch.Tensor
    target_seqs: Seqs
    target_flat: torch.Tensor
    predictor_seqs: Seqs
    predictor_target_rows: torch.Tensor
    context_sampled: int  # context tokens drawn for the batch, before any truncation

    @property
    def context_tokens(self) -> int:
        return int(self.context.index.numel())

    @property
    def target_tokens(self) -> int:
        return int(self.target_index.numel())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "MaskBatch":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return MaskBatch(
            batch_size=self.batch_size,
            num_targets=self.num_targets,
            num_patches=self.num_patches,
            context=TokenSelection(move(self.context.index), self.context.seqs.to(device)),
            target_index=move(self.target_index),
            target_seqs=self.target_seqs.to(device),
            target_flat=move(self.target_flat),
            predictor_seqs=self.predictor_seqs.to(device),
            predictor_target_rows=move(self.predictor_target_rows),
            context_sampled=self.context_sampled,
        )

    def pin_memory(self) -> "MaskBatch":
        pinned = [
            self.context.index.pin_memory(),
            self.context.seqs.cu_seqlens.pin_memory(),
            self.target_index.pin_memory(),
            self.target_seqs.cu_seqlens.pin_memory(),
            self.target_flat.pin_memory(),
            self.predictor_seqs.cu_seqlens.pin_memory(),
            self.predictor_target_rows.pin_memory(),
        ]
        ctx_idx, ctx_cu, tgt_idx, tgt_cu, flat, pred_cu, rows = pinned
        return MaskBatch(
            self.batch_size,
            self.num_targets,
            self.num_patches,
            TokenSelection(ctx_idx, _with_cu(self.context.seqs, ctx_cu)),
            tgt_idx,
            _with_cu(self.target_seqs, tgt_cu),
            flat,
            _with_cu(self.predictor_seqs, pred_cu),
            rows,
            self.context_sampled,
        )


def _with_cu(seqs: Seqs, cu: torch.Tensor) -> Seqs:
    return Seqs(cu, seqs.max_seqlen, seqs.uniform_len)


class MaskGenerator:
    """Draws a :class:`MaskBatch` for a batch of images on a square patch grid."""

    def __init__(self, grid_size: int, config: MaskConfig):
        self.grid = grid_size
        self.config = config
        self.corrected = config.mode == "corrected"
        # Largest block side and offset range: the reference stops one short of the edge.
        self.max_side = grid_size if self.corrected else grid_size - 1
        smallest_target = self._block_size(0.0, 0.0, config.target_scale, config.target_aspect)
        if smallest_target[0] * smallest_target[1] <= config.min_keep:
            raise ConfigError(
                f"on a {grid_size}x{grid_size} grid, target blocks at mask.target_scale={config.target_scale} can be "
                f"as small as {smallest_target[0]}x{smallest_target[1]} patches, not more than mask.min_keep="
                f"{config.min_keep}: lower mask.min_keep or raise mask.target_scale"
            )
        smallest_context = self._block_size(0.0, 0.0, config.context_scale, (1.0, 1.0))
        if smallest_context[0] * smallest_context[1] <= config.min_keep:
            raise ConfigError(
                f"context blocks at mask.context_scale={config.context_scale} can be as small as "
                f"{smallest_context[0]}x{smallest_context[1]} patches: lower mask.min_keep={config.min_keep}"
            )

    def _block_size(self, u_scale: float, u_aspect: float, scale, aspect) -> tuple[int, int]:
        keep = int(self.grid * self.grid * (scale[0] + u_scale * (scale[1] - scale[0])))
        ratio = aspect[0] + u_aspect * (aspect[1] - aspect[0])
        height = int(round(math.sqrt(keep * ratio)))
        width = int(round(math.sqrt(keep / ratio)))
        return max(1, min(height, self.max_side)), max(1, min(width, self.max_side))

    def _sample_sizes(self, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
        cfg = self.config
        if self.corrected:
            target = self._block_size(rng.random(), rng.random(), cfg.target_scale, cfg.target_aspect)
            context = self._block_size(rng.random(), 0.0, cfg.context_scale, (1.0, 1.0))
        else:  # one draw drives both scale and aspect ratio (quirk 1)
            u = rng.random()
            target = self._block_size(u, u, cfg.target_scale, cfg.target_aspect)
            u = rng.random()
            context = self._block_size(u, u, cfg.context_scale, (1.0, 1.0))
        return target, context

    def _offsets(self, rng: np.random.Generator, side: int, shape) -> np.ndarray:
        # Reference: randint(0, grid - side), so a block never touches the last row/column.
        high = self.grid - side + (1 if self.corrected else 0)
        return rng.integers(0, high, size=shape)

    def _blocks(self, top: np.ndarray, left: np.ndarray, height: int, width: int) -> np.ndarray:
        """Boolean block masks of shape top.shape + (grid * grid,)."""
        idx = np.arange(self.grid)
        rows = (idx >= top[..., None]) & (idx < top[..., None] + height)
        cols = (idx >= left[..., None]) & (idx < left[..., None] + width)
        return (rows[..., :, None] & cols[..., None, :]).reshape(*top.shape, self.grid * self.grid)

    def sample_masks(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Boolean (B, N) context masks and (B, M, N) target masks, before truncation."""
        cfg, num_targets = self.config, self.config.num_targets
        (th, tw), (ch, cw) = self._sample_sizes(rng)
        targets = self._blocks(
            self._offsets(rng, th, (batch_size, num_targets)), self._offsets(rng, tw, (batch_size, num_targets)), th, tw
        )
        # allowed[b, k]: patches outside the first k target blocks of image b.
        if cfg.allow_overlap:
            covered = np.zeros((batch_size, 1, self.grid * self.grid), dtype=bool)
        else:
            covered = np.zeros((batch_size, num_targets + 1, self.grid * self.grid), dtype=bool)
            np.logical_or.accumulate(targets, axis=1, out=covered[:, 1:])
        allowed_level = np.full(batch_size, covered.shape[1] - 1)

        context = np.empty((batch_size, self.grid * self.grid), dtype=bool)
        todo = np.arange(batch_size)
        budget = np.full(batch_size, _REDRAWS_PER_RELAXATION)
        while todo.size:
            block = self._blocks(self._offsets(rng, ch, todo.size), self._offsets(rng, cw, todo.size), ch, cw)
            context[todo] = block & ~covered[todo, allowed_level[todo]]
            failed = context[todo].sum(1) <= cfg.min_keep
            todo = todo[failed]
            budget[todo] -= 1
            relax = todo[budget[todo] == 0]
            allowed_level[relax] = np.maximum(allowed_level[relax] - 1, 0)
            budget[relax] = _REDRAWS_PER_RELAXATION
        return context, targets

    def __call__(self, batch_size: int, rng: np.random.Generator, rows: slice | None = None) -> MaskBatch:
        """Masks for ``batch_size`` images. With ``rows``, masks are drawn (block sizes and
        positions) for the whole batch and only those images are returned: one rank's part
        of a global batch, as a one-process run would draw it. Truncation is to the shortest
        context of the returned rows, as a rank's own collator truncates its batch."""
        context, targets = self.sample_masks(batch_size, rng)
        return self.pack(context, targets, rows)

    def pack(self, context: np.ndarray, targets: np.ndarray, rows: slice | None = None) -> MaskBatch:
        """The MaskBatch of boolean (B, N) context and (B, M, N) target masks (as drawn by
        ``sample_masks``, or by another collator), of the images ``rows`` (default: all),
        truncated as ``mask.context`` says."""
        if rows is not None:
            context, targets = context[rows], targets[rows]
        batch_size = context.shape[0]
        num_patches = self.grid * self.grid
        num_targets = targets.shape[1]
        context_lens = context.sum(1)
        context_sampled = int(context_lens.sum())
        if self.config.context == "truncate":
            keep_len = int(context_lens.min())
            context = context & (np.cumsum(context, axis=1) <= keep_len)  # raster order: bottom patches go (quirk 4)
            context_lens = np.full(batch_size, keep_len)
        _, context_index = np.nonzero(context)
        # Target sequences in block-major order, s = m * B + b.
        target_masks = targets.transpose(1, 0, 2).reshape(num_targets * batch_size, num_patches)
        target_seq, target_index = np.nonzero(target_masks)
        target_lens = target_masks.sum(1)
        target_flat = (target_seq % batch_size) * num_patches + target_index

        # Predictor sequence s = [context of image s % B ; target block s].
        seq_context_lens = np.tile(context_lens, num_targets)
        pred_lens = seq_context_lens + target_lens
        pred_starts = np.concatenate([[0], np.cumsum(pred_lens)[:-1]])
        target_starts = np.concatenate([[0], np.cumsum(target_lens)[:-1]])
        within = np.arange(target_index.size) - target_starts[target_seq]
        pred_target_rows = pred_starts[target_seq] + seq_context_lens[target_seq] + within

        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        return MaskBatch(
            batch_size=batch_size,
            num_targets=num_targets,
            num_patches=num_patches,
            context=TokenSelection(as_long(context_index), Seqs.from_lengths(context_lens.tolist())),
            target_index=as_long(target_index),
            target_seqs=Seqs.from_lengths(target_lens.tolist()),
            target_flat=as_long(target_flat),
            predictor_seqs=Seqs.from_lengths(pred_lens.tolist()),
            predictor_target_rows=as_long(pred_target_rows),
            context_sampled=context_sampled,
        )
