"""The batches ``train_step.py`` steps through: synthetic images with a fixed pool of real
mask batches that the steps cycle through (as a long run's shapes repeat), or the real
loader (``--loader``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scalejepa.config import Config
from scalejepa.masks import MaskGenerator, mask_rng


def draw_masks(config: Config, batch: int, count: int, seed: int):
    generator = MaskGenerator(config.model.image_size // config.model.patch_size, config.mask)
    return [generator(batch, mask_rng(seed, 0, 0, i)) for i in range(count)]


@dataclass
class SyntheticBatch:
    images: torch.Tensor
    masks: Any


def prepare_batches(args, config: Config, device: torch.device, count: int):
    """(host masks of each of ``count`` steps, fn(step) -> a batch with ``.images`` and device
    ``.masks``). Synthetic: random images made before timing; step i takes mask batch
    ``i % --mask-pool`` of a pool drawn before timing; ``--loader``: the real TrainLoader
    (its masks are read from each batch as it comes)."""
    if args.loader:
        return loader_batches(args, config, device, count)
    pool = draw_masks(config, args.batch, args.mask_pool, args.seed)
    device_masks = [m.to(device) for m in pool]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    size = config.model.image_size
    images = [torch.randn(args.batch, 3, size, size, device=device, generator=gen) for _ in range(2)]
    host = [pool[i % len(pool)] for i in range(count)]
    return host, lambda i: SyntheticBatch(images[i % 2], device_masks[i % len(pool)])


def loader_batches(args, config: Config, device: torch.device, count: int):
    # Imported here: only --loader needs them, and the GPU image has no webdataset for loader.py.
    from loader import photo_shards  # benchmarks/loader.py: RGB photo shards, cached

    from scalejepa.data.cache import default_cache_root, resolve_shards
    from scalejepa.data.pipeline import TrainLoader

    shards = args.shards or str(photo_shards(default_cache_root().parent / "loader-bench", crops=24, max_side=500,
                                             quality=90))
    urls, _ = resolve_shards(shards)
    generator = MaskGenerator(config.model.image_size // config.model.patch_size, config.mask)
    loader = TrainLoader(urls, batch_size=args.batch, image_size=config.model.image_size,
                         crop_scale=config.data.crop_scale, mean=config.data.mean, std=config.data.std,
                         mask_generator=generator, seed=args.seed, num_workers=args.loader_workers,
                         shuffle_buffer=min(config.data.shuffle_buffer, 256), jpeg_draft=config.data.jpeg_draft,
                         device=device)
    # Masks are only known when a batch arrives: the list fills in as the loader delivers.
    host: list = [None] * count

    def next_batch(i):
        batch = next(loader)
        host[i] = batch.masks  # read (a sync) only after the timed loop
        return batch

    return host, next_batch
