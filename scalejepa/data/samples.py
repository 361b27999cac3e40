"""Reading shard samples, shared by training and evaluation: tar -> samples -> (image, label).

A sample is WebDataset's dict (``__key__``, ``__url__``, one entry per file extension).
Its image is the first of ``IMAGE_KEYS`` present, its label the integer in ``.cls`` (-1
when there is none). ``decode_sample`` applies a caller's transform (random crop for
training, center crop for evaluation) and turns every way a sample can be unusable (no
image, an image Pillow cannot decode, a label that is not an integer) into one
``SampleError`` naming the sample; the caller decides whether that is a skip or a stop.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator

import numpy as np

from .images import DECODE_ERRORS

__all__ = ["IMAGE_KEYS", "SHARD_READ_ERRORS", "SampleError", "decode_sample", "read_tar", "sample_name"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# What reading a tar that is missing, unreadable, truncated or not a tar raises.
SHARD_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, tarfile.TarError, EOFError)


class SampleError(ValueError):
    """One sample cannot be used; the message names it and says why."""


def sample_name(sample: dict) -> str:
    return f"sample {sample.get('__key__')} of {sample.get('__url__')}"


def read_tar(url: str) -> Iterator[dict]:
    """The samples of one tar, in order. Read errors (``SHARD_READ_ERRORS``) propagate."""
    import webdataset as wds  # here: not in the GPU image, which trains on synthetic data without it

    yield from wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([{"url": url}]))


def decode_sample(sample: dict, transform: Callable[[bytes], np.ndarray]) -> tuple[np.ndarray, int]:
    """(``transform(image bytes)``, label); ``SampleError`` when the sample is unusable."""
    data = next((sample[k] for k in IMAGE_KEYS if sample.get(k)), None)
    if data is None:
        raise SampleError(f"{sample_name(sample)} has no image ({', '.join(IMAGE_KEYS)})")
    raw = sample.get("cls")
    try:
        label = int(raw) if raw is not None else -1
    except ValueError:
        raise SampleError(f"{sample_name(sample)}: label {raw!r} is not a class index") from None
    try:
        image = transform(data)
    except DECODE_ERRORS as exc:
        raise SampleError(f"{sample_name(sample)}: cannot decode the image "
                          f"({type(exc).__name__}: {exc})") from exc
    return image, label
