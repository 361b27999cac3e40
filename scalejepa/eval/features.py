"""Frozen-encoder features over labeled shards, the paper's protocol: resize + center crop
+ normalise (no augmentation), average-pooled patch tokens of the last block (or the last
``last_n`` blocks, concatenated).

Shards are read once, in order, with no resampling. Samples are decoded by
``scalejepa.data.samples.decode_sample``, the training pipeline's decoder, with the eval
transform. Unlike training, an evaluation never skips: a sample or shard that cannot be
read stops it with an ``EvalDataError`` naming the sample or shard (a score over a
silently smaller set would not be comparable). Under torchrun every rank takes a
share (whole shards when there are at least as many as readers, else every reader scans
all shards and keeps every n-th sample), features are all-gathered (uneven shares are
padded for the collective and trimmed after) and sorted by (shard, position), so the
result does not depend on the number of ranks or loader workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scalejepa.data.pipeline import normalize  # the training pipeline's, so features see the same inputs
from scalejepa.data.samples import SHARD_READ_ERRORS, SampleError, decode_sample, read_tar
from scalejepa.data.transforms import decode_center_crop

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0
_POSITION_BITS = 32  # sample order key = shard index << 32 | position within the shard


class EvalDataError(ValueError):
    """The evaluation shards cannot be used as given (no labels, no images, ...)."""


@dataclass
class Features:
    features: torch.Tensor  # (N, D) float32, on the CPU
    labels: torch.Tensor  # (N,) int64, -1 where a sample has no label
    order: torch.Tensor  # (N,) int64 (shard << 32 | position): the samples' place in the shard set

    def __len__(self) -> int:
        return self.labels.numel()

    def require_labels(self, what: str) -> None:
        if len(self) == 0:
            raise EvalDataError(f"the {what} shards hold no samples")
        unlabeled = int((self.labels < 0).sum())
        if unlabeled:
            raise EvalDataError(
                f"{unlabeled} of {len(self)} {what} samples have no class label (.cls): build labeled shards "
                "from an ImageFolder directory (DIR/<class>/<image>) with scalejepa-make-shards"
            )


# ----------------------------------------------------------------------------- reading shards


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reader_share(num_shards: int, part: int, num_parts: int) -> tuple[list[int], int | None]:
    """(shard indices to read, sample stride or None) for reader ``part`` of ``num_parts``:
    whole shards when there are enough of them, else all shards and every
    ``num_parts``-th sample (so no reader is left empty and none reads a sample twice)."""
    if num_shards >= num_parts:
        return list(range(part, num_shards, num_parts)), None
    return list(range(num_shards)), num_parts


def iter_shard_samples(urls: Sequence[str], part: int = 0, num_parts: int = 1) -> Iterator[tuple[int, dict]]:
    """(order key, raw webdataset sample) for this reader's share, in shard order."""
    shards, stride = reader_share(len(urls), part, num_parts)
    for shard in shards:
        try:  # one finite pass; a shard that cannot be read stops the evaluation
            for position, sample in enumerate(read_tar(urls[shard])):
                if stride is None or position % stride == part:
                    yield (shard << _POSITION_BITS) | position, sample
        except SHARD_READ_ERRORS as exc:
            raise EvalDataError(f"cannot read eval shard {urls[shard]} ({type(exc).__name__}: {exc}); "
                                "check the file or rebuild the shards") from exc


def decode_eval_sample(sample: dict, image_size: int) -> tuple[np.ndarray, int]:
    """The eval transform of one sample: (size, size, 3) uint8, label (-1 if none)."""
    try:
        return decode_sample(sample, partial(decode_center_crop, size=image_size))
    except SampleError as exc:
        raise EvalDataError(f"{exc}; rebuild the shards") from exc


class EvalShards(IterableDataset):
    """Decoded eval images of one rank's share, split further over loader workers."""

    def __init__(self, urls: Sequence[str], image_size: int, rank: int = 0, world_size: int = 1):
        if not urls:
            raise EvalDataError("no shards to evaluate on")
        self.urls, self.image_size = list(urls), image_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        part, parts = self.rank * workers + worker, self.world_size * workers
        for key, sample in iter_shard_samples(self.urls, part, parts):
            image, label = decode_eval_sample(sample, self.image_size)
            yield torch.from_numpy(image.copy()).permute(2, 0, 1), label, key  # PIL arrays are read-only


def load_images(urls: Sequence[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a (small) shard set, decoded once: (N, 3, S, S) uint8, (N,) labels."""
    images, labels = [], []
    for _, sample in iter_shard_samples(urls):
        image, label = decode_eval_sample(sample, image_size)
        images.append(image)
        labels.append(label)
    if not images:
        raise EvalDataError(f"no samples in {len(urls)} shard(s), first {urls[0]}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


# ----------------------------------------------------------------------------- features


def pooled_features(encoder: nn.Module, images: torch.Tensor, last_n: int = 1) -> torch.Tensor:
    """Average-pooled patch tokens, float32 (B, D * last_n).

    ``last_n == 1`` goes through ``encoder(images)`` so that wrappers (FSDP2, compile)
    run their hooks: use it on a training encoder. ``last_n > 1`` needs a plain
    :class:`VisionTransformer`."""
    if last_n == 1:
        tokens = encoder(images)
        return tokens.view(images.shape[0], -1, tokens.shape[-1]).float().mean(1)
    return encoder.forward_pooled(images, last_n).float()


class Progress:
    """A log line every PROGRESS_SECONDS on rank 0."""

    def __init__(self, what: str, total: int | None, enabled: bool):
        self.what, self.total, self.enabled = what, total, enabled
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        if self.total:
            eta = (self.total - done) / max(rate, 1e-9)
            log.info("%s: %d/%d images (%.0f%%), %.0f img/s, ETA %.0f s", self.what, done, self.total,
                     100 * done / self.total, rate, eta)
        else:
            log.info("%s: %d images, %.0f img/s", self.what, done, rate)

    def done(self, count: int) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            log.info("%s: %d images in %.1f s (%.0f img/s)", self.what, count, elapsed, count / max(elapsed, 1e-9))


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    urls: Sequence[str],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    last_n: int = 1,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    total: int | None = None,
    what: str = "features",
) -> Features:
    """Features of every sample in ``urls``, on every rank (gathered when distributed).

    ``total`` (the shard set's sample count, if known) only feeds the progress lines.
    """
    device = torch.device(device)
    rank, world = dist_info()
    dataset = EvalShards(urls, image_size, rank, world)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    progress = Progress(what, total, enabled=rank == 0)
    feats, labels, order = [], [], []
    for images, batch_labels, keys in loader:
        images = normalize(images.to(device, non_blocking=True), mean, std)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            feats.append(pooled_features(encoder, images, last_n).cpu())
        labels.append(batch_labels)
        order.append(keys)
        progress.update(sum(len(x) for x in labels) * world)  # rank 0's share, times the ranks
    dim = feats[0].shape[1] if feats else _feature_dim(encoder, last_n)
    local = Features(
        torch.cat(feats) if feats else torch.empty(0, dim),
        torch.cat(labels).long() if labels else torch.empty(0, dtype=torch.long),
        torch.cat(order).long() if order else torch.empty(0, dtype=torch.long),
    )
    gathered = gather_features(local, device) if world > 1 else local
    sort = torch.argsort(gathered.order)
    result = Features(gathered.features[sort], gathered.labels[sort], gathered.order[sort])
    progress.done(len(result))
    return result


def _feature_dim(encoder: nn.Module, last_n: int) -> int:
    return int(getattr(encoder, "embed_dim")) * last_n


def gather_rows(local: torch.Tensor, device: torch.device, chunk_rows: int = 1 << 16) -> torch.Tensor:
    """Concatenation over ranks of each rank's rows (counts may differ), on the CPU.

    Rows travel in padded chunks through ``device`` (NCCL needs GPU tensors), so memory
    on the device stays bounded by ``world x chunk_rows`` rows."""
    _, world = dist_info()
    counts = torch.tensor([local.shape[0]], device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    longest = max(sizes)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(longest, 1), chunk_rows):
        block = local[start:start + chunk_rows].to(device)
        pad = min(chunk_rows, longest - start) - block.shape[0]
        if pad > 0:
            block = torch.cat([block, block.new_zeros((pad, *block.shape[1:]))])
        received = [torch.empty_like(block) for _ in range(world)]
        dist.all_gather(received, block.contiguous())
        for r, tensor in enumerate(received):
            keep = max(0, min(sizes[r] - start, tensor.shape[0]))
            parts[r].append(tensor[:keep].cpu())
    return torch.cat([torch.cat(p) for p in parts])


def gather_features(local: Features, device: torch.device) -> Features:
    return Features(gather_rows(local.features, device), gather_rows(local.labels, device),
                    gather_rows(local.order, device))
