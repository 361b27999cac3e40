"""The training input pipeline: WebDataset shards -> decoded crops + masks, batched.

Data order is a pure function of (seed, rank, stream, position), so a resumed run sees
exactly the batches an uninterrupted one would have:

* Each rank reads its own share of the shards (an explicit node splitter; every rank
  reads all of them when there are fewer shards than ranks) and draws from them with
  replacement (resampled shards), so no rank ever runs dry.
* The rank's batches are spread over ``W`` logical *streams*, one per loader worker:
  stream ``w`` makes the batches of steps ``s`` with ``s % W == w``. A stream reads a
  sequence of *segments*: segment ``k`` is one shard drawn by a generator seeded with
  (seed, rank, stream, k), read in order through a shuffle buffer seeded the same way.
  Crops come from a generator seeded by the sample's (segment, position) and masks from
  one seeded by (seed, rank, stream, step).
* A stream's position is (segment, samples consumed). The trainer records the position
  of every batch it takes and saves it in checkpoints; on resume each stream reopens its
  shard and skips the consumed samples without decoding them.

Data faults (decided here, tested in tests/test_faults_data.py):

* A corrupt sample (undecodable image, no image, a label that is not an integer; see
  ``scalejepa.data.samples``) is skipped with a warning and counted (``Batch.corrupt``),
  never retried with a sleep and never silently dropped from the count. Odd but valid
  images (grayscale, CMYK, RGBA, palette, 16-bit, EXIF-rotated) become upright RGB.
* A shard that is missing, unreadable or broken when a segment opens it, or that fails
  part way (a truncated tar), ends that segment: the samples read before the failure are
  still used, the failure is logged with the shard's path and counted
  (``Batch.shard_errors``), and the stream goes on with its next segment, i.e. another
  drawn shard. Data order stays a function of the position, so a resumed run agrees with
  the uninterrupted one as long as the same shards fail.
* When every shard of the rank has failed or yielded only corrupt samples since the last
  usable sample, the stream raises ``ShardDataError`` naming the shards and why, instead
  of spinning forever.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scalejepa.data.samples import SHARD_READ_ERRORS, SampleError, decode_sample, read_tar
from scalejepa.data.transforms import decode_random_crop
from scalejepa.masks import MaskBatch, MaskGenerator, mask_rng

log = logging.getLogger(__name__)

_SEGMENT_TAG = 0x5E6  # separates the segment generators' seeds from the mask generators'
_SYNTHETIC_TAG = 0x5A7  # separates synthetic images' seeds from everything else


class ShardDataError(RuntimeError):
    """No shard of this rank gives a usable sample any more."""


@dataclass
class _StreamCounts:
    corrupt: int = 0  # corrupt samples skipped
    shard_errors: int = 0  # segments cut short by a shard that failed to read


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) uint8 on the host, float normalised on the device
    labels: torch.Tensor  # (B,) int64, -1 where a sample has no label
    masks: MaskBatch
    step: int
    stream: int
    position: tuple[int, int]  # the stream's (segment, samples consumed) after this batch
    corrupt: int = 0  # corrupt samples this stream has skipped so far
    shard_errors: int = 0  # shard reads this stream has seen fail so far

    def pin_memory(self) -> "Batch":
        return Batch(
            self.images.pin_memory(), self.labels.pin_memory(), self.masks.pin_memory(),
            self.step, self.stream, self.position, self.corrupt, self.shard_errors,
        )


def split_by_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Explicit node splitter: rank r reads shards r, r + world, ...; all shards when
    there are fewer shards than ranks (resampling keeps the ranks' streams distinct)."""
    if world_size <= 1:
        return list(urls)
    if len(urls) < world_size:
        log.warning("%d shards for %d ranks: every rank reads all shards; write more shards", len(urls), world_size)
        return list(urls)
    return list(urls[rank::world_size])


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle buffer, deterministic given ``rng``."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


def _read_until_failure(url: str, failures: list[BaseException]) -> Iterator[dict]:
    """The shard's samples; a read error ends them and is appended to ``failures``, so the
    shuffle buffer still hands out what was read before it."""
    try:
        yield from read_tar(url)
    except SHARD_READ_ERRORS as exc:
        failures.append(exc)


class ShardStreams(IterableDataset):
    """The rank's batch streams; one per DataLoader worker (see the module docstring)."""

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        image_size: int,
        crop_scale: tuple[float, float],
        mask_generator: MaskGenerator,
        seed: int,
        rank: int,
        num_streams: int,
        start_step: int = 0,
        positions: dict[int, tuple[int, int]] | None = None,
        shuffle_buffer: int = 1000,
        jpeg_draft: bool = True,
    ):
        if not urls:
            raise ValueError("no shards to read")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.image_size = image_size
        self.crop_scale = crop_scale
        self.mask_generator = mask_generator
        self.seed = seed
        self.rank = rank
        self.num_streams = num_streams
        self.start_step = start_step
        self.positions = dict(positions or {})
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.jpeg_draft = jpeg_draft

    def _samples(self, stream: int, counts: _StreamCounts) -> Iterator[tuple[np.ndarray, int, tuple[int, int]]]:
        """(image, label, position after this sample) of the usable samples, forever;
        corrupt samples and failed shard reads are skipped and tallied in ``counts``."""
        segment, skip = self.positions.get(stream, (0, 0))
        failing: dict[str, str] = {}  # shards with no usable sample since the last usable one -> why
        while True:
            rng = np.random.default_rng([self.seed, self.rank, stream, segment, _SEGMENT_TAG])
            url = self.urls[int(rng.integers(len(self.urls)))]
            failures: list[BaseException] = []
            read = usable = 0
            for position, sample in enumerate(_shuffled(_read_until_failure(url, failures), self.shuffle_buffer, rng),
                                              start=1):
                read = position
                if position <= skip:
                    continue
                crop_rng = np.random.default_rng([self.seed, self.rank, stream, segment, position])
                crop = partial(decode_random_crop, size=self.image_size, scale=self.crop_scale, rng=crop_rng,
                               draft=self.jpeg_draft)
                try:
                    image, label = decode_sample(sample, crop)
                except SampleError as exc:
                    counts.corrupt += 1
                    log.warning("skipping corrupt %s", exc)
                    continue
                usable += 1
                failing.clear()
                yield image, label, (segment, position)
            why = None
            if failures:
                counts.shard_errors += 1
                why = f"{type(failures[0]).__name__}: {failures[0]}"
                log.warning("shard %s failed after %d samples (%s); stream %d goes on with its next segment",
                            url, read, why, stream)
            if not usable and (failures or read > skip or read == 0):  # not: a resume that skipped it all
                failing[url] = why or ("no samples" if read == 0 else "only corrupt samples")
                if len(failing) == len(set(self.urls)):
                    shown = "; ".join(f"{u}: {w}" for u, w in list(failing.items())[:3])
                    raise ShardDataError(
                        f"none of the {len(failing)} shard(s) of rank {self.rank} gives a usable sample "
                        f"({shown}{' ...' if len(failing) > 3 else ''}); check the files or rebuild them "
                        "with scalejepa-make-shards"
                    )
            segment, skip = segment + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != self.num_streams:
            raise RuntimeError(f"{num_workers} loader workers for {self.num_streams} streams")
        # Loader worker j makes steps start + j, start + j + W, ...: stream (start + j) % W.
        stream = (self.start_step + worker) % self.num_streams
        step = self.start_step + worker
        counts = _StreamCounts()
        samples = self._samples(stream, counts)
        while True:
            images, labels, positions = zip(*(next(samples) for _ in range(self.batch_size)))
            masks = self.mask_generator(self.batch_size, mask_rng(self.seed, self.rank, stream, step))
            yield Batch(
                images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2),
                labels=torch.tensor(labels, dtype=torch.int64),
                masks=masks,
                step=step,
                stream=stream,
                position=positions[-1],
                corrupt=counts.corrupt,
                shard_errors=counts.shard_errors,
            )
            step += self.num_streams


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, normalised with per-channel mean/std (in 0-1 units);
    the training and evaluation pipelines both use it."""
    mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


@dataclass
class LoaderState:
    """What a checkpoint needs to continue the data exactly where it stopped."""

    num_streams: int
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    corrupt: dict[int, int] = field(default_factory=dict)
    shard_errors: dict[int, int] = field(default_factory=dict)

    def to_rows(self) -> list[list[int]]:
        """The checkpointed form (``scalejepa.checkpoint.TrainState``): one row per stream,
        ``[segment, samples consumed, corrupt samples, shard errors]``, -1s for a stream
        that has not delivered a batch yet."""
        return [[*self.positions[s], self.corrupt.get(s, 0), self.shard_errors.get(s, 0)] if s in self.positions
                else [-1, -1, -1, -1] for s in range(self.num_streams)]

    @classmethod
    def from_rows(cls, rows: list[list[int]]) -> "LoaderState":
        started = [(s, row) for s, row in enumerate(rows) if row[0] >= 0]
        return cls(
            num_streams=len(rows),
            positions={s: (int(row[0]), int(row[1])) for s, row in started},
            corrupt={s: int(row[2]) for s, row in started},
            shard_errors={s: int(row[3]) for s, row in started},
        )


class TrainLoader:
    """Iterates device-ready batches from shards; tracks the data position for checkpoints.

    ``stream_options``: the keywords of :class:`ShardStreams` (``batch_size``,
    ``image_size``, ``crop_scale``, ``mask_generator``, ``seed``, ``start_step``,
    ``shuffle_buffer``, ``jpeg_draft``); the streams and their positions come from here."""

    def __init__(
        self,
        urls: list[str],
        *,
        mean,
        std,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        state: LoaderState | None = None,
        device: torch.device = torch.device("cpu"),
        **stream_options,
    ):
        num_streams = max(1, num_workers)
        if state is not None and state.num_streams != num_streams:
            log.warning(
                "checkpoint data position has %d streams but data.num_workers=%d: streams restart from fresh seeds "
                "(the run continues, but not on the exact batches an uninterrupted run would see)",
                state.num_streams, num_workers,
            )
            state = None
        self.state = state or LoaderState(num_streams)
        self.mean, self.std, self.device = mean, std, device
        dataset = ShardStreams(split_by_rank(urls, rank, world_size), rank=rank, num_streams=num_streams,
                               positions=self.state.positions, **stream_options)
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if num_workers else None,
            persistent_workers=False,
        )
        self._iterator = iter(self.loader)

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        self.state.positions[batch.stream] = batch.position
        self.state.corrupt[batch.stream] = batch.corrupt
        self.state.shard_errors[batch.stream] = batch.shard_errors
        batch.images = normalize(batch.images.to(self.device, non_blocking=True), self.mean, self.std)
        batch.labels = batch.labels.to(self.device, non_blocking=True)
        batch.masks = batch.masks.to(self.device)
        return batch

    def __iter__(self):
        return self

    @property
    def corrupt_total(self) -> int:
        return sum(self.state.corrupt.values())

    @property
    def shard_errors_total(self) -> int:
        return sum(self.state.shard_errors.values())


class SyntheticLoader:
    """Random images made on the device, real masks: for benchmarks, smoke runs and tests
    without a data set.

    Every batch is a function of (seed, micro-step, global sample index) only: rank ``r``
    of ``world_size`` gets images ``[r * B, (r + 1) * B)`` of one global batch of
    ``world_size * B`` images, and its masks are drawn for the whole global batch (block
    sizes and positions shared) then sliced. With ``mask.context=truncate`` each rank cuts
    its own B contexts to their shortest, as :class:`TrainLoader` (and the reference's
    per-rank collator) does, so per-image FLOPs at N ranks are those of a real N-rank run.
    With ``mask.context=pack`` a run on any number of ranks trains on exactly the global
    batches of a one-process run, and a resumed run, on any world size, continues
    them exactly (with truncate, on the same world size). The price: every rank draws the
    masks of the whole global batch (~30-60 ms of host time per step for 2048 images on a
    16x16 grid) and seeds one generator per image.
    """

    def __init__(self, *, batch_size: int, image_size: int, mask_generator: MaskGenerator, seed: int,
                 rank: int = 0, world_size: int = 1, start_step: int = 0,
                 device: torch.device = torch.device("cpu")):
        self.batch_size, self.image_size = batch_size, image_size
        self.mask_generator, self.seed, self.rank, self.world_size = mask_generator, seed, rank, world_size
        self.step, self.device = start_step, device
        self.generator = torch.Generator(device=device)
        self.state = LoaderState(1)
        self.corrupt_total = self.shard_errors_total = 0

    def _sample_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.step, index, _SYNTHETIC_TAG]).generate_state(1)[0])

    def __next__(self) -> Batch:
        first = self.rank * self.batch_size
        images = torch.empty(self.batch_size, 3, self.image_size, self.image_size, device=self.device)
        for i in range(self.batch_size):  # one generator state per sample: independent of the split
            self.generator.manual_seed(self._sample_seed(first + i))
            torch.randn(images.shape[1:], device=self.device, generator=self.generator, out=images[i])
        masks = self.mask_generator(self.batch_size * self.world_size, mask_rng(self.seed, 0, 0, self.step),
                                    rows=slice(first, first + self.batch_size))
        batch = Batch(images, torch.full((self.batch_size,), -1, device=self.device), masks.to(self.device),
                      self.step, 0, (0, 0))
        self.step += 1
        return batch

    def __iter__(self):
        return self
