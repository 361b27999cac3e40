"""Weighted k-nearest-neighbour classification on frozen features (DINO / DINOv2's
protocol): cosine similarity of L2-normalised features, each of the k nearest training
samples votes for its class with weight exp(similarity / T), T = 0.07.

:class:`KnnEvaluator` serves periodic evaluation during training: the small labeled
image set is decoded once and kept in memory, so each call costs one forward pass over it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scalejepa.data.cache import resolve_shards
from scalejepa.eval.features import dist_info, load_images, normalize
from scalejepa.eval.monitors import position_moments, position_share_from_moments

log = logging.getLogger(__name__)

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
HEADLINE_K = 20  # the k reported as "top1" (DINO's 20-NN)
_SIMILARITY_BUDGET = 1 << 26  # similarity entries per chunk (256 MiB in fp32)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    num_classes: int | None = None,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (percent) for each k: ``{k: {"top1": .., "top5": ..}}``.

    A k larger than the training set is clamped to its size (the key stays k). Features
    may live on any device; the work is chunked over validation samples."""
    if train_features.shape[0] == 0 or val_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training and one validation sample")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device)
    classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    max_k = min(max(ks), train.shape[0])
    chunk = max(1, _SIMILARITY_BUDGET // train.shape[0])
    correct = {k: torch.zeros(2, dtype=torch.long, device=device) for k in ks}
    for start in range(0, val_features.shape[0], chunk):
        val = F.normalize(val_features[start:start + chunk].to(device).float(), dim=1)
        target = val_labels[start:start + chunk].to(device)
        similarity, index = (val @ train.T).topk(max_k, dim=1)
        neighbour_labels = train_labels[index]
        weights = (similarity / temperature).exp()
        for k in ks:
            kk = min(k, max_k)
            votes = torch.zeros(val.shape[0], classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            top = votes.topk(min(5, classes), dim=1).indices
            hits = top == target[:, None]
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    total = val_features.shape[0]
    return {k: {"top1": round(100.0 * float(c[0]) / total, 4), "top5": round(100.0 * float(c[1]) / total, 4)}
            for k, c in correct.items()}


def knn_report(results: dict[int, dict[str, float]], headline_k: int = HEADLINE_K) -> dict:
    """JSON-ready summary: ``top1`` / ``top5`` at ``headline_k`` (or the nearest k run)."""
    k = min(results, key=lambda x: (abs(x - headline_k), x))
    return {"top1": results[k]["top1"], "top5": results[k]["top5"], "k": k,
            "per_k": {str(kk): r for kk, r in sorted(results.items())}}


# ----------------------------------------------------------------------------- during training


class KnnEvaluator:
    """Periodic kNN on a small labeled shard set, kept decoded in memory.

    Call it on every rank (a sharded encoder's forward is collective): each rank encodes
    an equal share (padded), the features are all-gathered, every rank gets the result.
    """

    def __init__(self, train_shards: str, val_shards: str, image_size: int, *, k: int = HEADLINE_K,
                 temperature: float = TEMPERATURE, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), batch_size: int = 256):
        self.train_shards, self.val_shards, self.image_size = train_shards, val_shards, image_size
        self.k, self.temperature, self.mean, self.std, self.batch_size = k, temperature, mean, std, batch_size
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train images, train labels, val images, val labels), decoded on first use."""
        if self._data is None:
            loaded = []
            for what, spec in (("train", self.train_shards), ("val", self.val_shards)):
                if not spec:
                    raise ValueError(f"kNN evaluation needs {what} shards (eval.knn_{what}_shards)")
                images, labels = load_images(resolve_shards(spec)[0], self.image_size)
                if (labels < 0).any():
                    raise ValueError(f"eval.knn_{what}_shards={spec!r} has samples without a class label (.cls)")
                loaded += [images, labels]
            self._data = tuple(loaded)
            log.info("kNN eval set: %d train / %d val images of %dx%d, decoded once",
                     len(loaded[1]), len(loaded[3]), self.image_size, self.image_size)
        return self._data

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, device: torch.device | str,
                 autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
        """``{"knn_top1": .., "knn_top5": ..}`` (percent) of ``encoder`` (features of its last
        block), and the ``position_share`` of its validation tokens (``eval.monitors``)."""
        train_images, train_labels, val_images, val_labels = self.data()
        device = torch.device(device)
        train, _ = self._encode(encoder, train_images, device, autocast_dtype)
        val, moments = self._encode(encoder, val_images, device, autocast_dtype)
        result = knn_classify(train, train_labels, val, val_labels, ks=(self.k,), temperature=self.temperature)
        num_patches = (moments.numel() - 2) // val.shape[1]  # moments: N x D sums, then 2 scalars
        return {"knn_top1": result[self.k]["top1"], "knn_top5": result[self.k]["top5"],
                "position_share": float(position_share_from_moments(moments, num_patches))}

    def _encode(self, encoder: nn.Module, images: torch.Tensor, device: torch.device,
                autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features of every image, summed position moments of their tokens)."""
        rank, world = dist_info()
        # Equal shares, the last one padded by repeating images: every rank runs the same
        # number of equally sized forward passes, as a sharded encoder requires.
        share = -(-images.shape[0] // world)
        index = torch.arange(rank * share, (rank + 1) * share)
        real = index < images.shape[0]  # the padding's repeats stay out of the moments
        mine = images[index.clamp_max(images.shape[0] - 1)]
        pooled, moments = [], []
        for start in range(0, share, self.batch_size):
            batch = normalize(mine[start:start + self.batch_size].to(device, non_blocking=True), self.mean, self.std)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                tokens = encoder(batch)
            tokens = tokens.view(batch.shape[0], -1, tokens.shape[-1]).float()
            pooled.append(tokens.mean(1))
            moments.append(position_moments(tokens[real[start:start + self.batch_size].to(device)]))
        features, moments = torch.cat(pooled), torch.stack(moments).sum(0)
        if world > 1:
            gathered = [torch.empty_like(features) for _ in range(world)]
            torch.distributed.all_gather(gathered, features)
            features = torch.cat(gathered)
            torch.distributed.all_reduce(moments)
        return features[: images.shape[0]], moments
