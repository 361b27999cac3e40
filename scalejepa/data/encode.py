"""Input images -> the JPEG bytes a shard stores, in-process or in a process pool.

A JPEG in L or RGB mode with no EXIF rotation is stored byte-for-byte (after a
reduced-size decode that proves it is complete). Everything else (PNG, BMP, WebP,
GIF/TIFF first frame, CMYK JPEG, EXIF-rotated JPEG, raw arrays) is re-encoded to JPEG
at ``JPEG_QUALITY`` after applying its EXIF orientation, with the pixel modes turned into
L or RGB by ``scalejepa.data.images.to_l_or_rgb``. An image that cannot be read or
decoded (truncated, corrupt, a decompression bomb) comes back as an ``Encoded`` with
``data=None`` and the reason, for the writer to skip and count.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from .builtin import Record
from .images import DECODE_ERRORS, needs_transpose, to_l_or_rgb, upright

__all__ = ["JPEG_QUALITY", "Encoded", "auto_workers", "encode_image", "encode_record", "encoded_stream"]

JPEG_QUALITY = 95


class Encoded(NamedTuple):
    key: str
    label: int
    data: bytes | None  # JPEG bytes, or None when the input was skipped
    kept: bool  # original JPEG bytes stored as they are
    error: str | None
    origin: str  # file path or key, for messages


def _verify_jpeg(im: Image.Image) -> None:
    # A reduced-size (DCT-scaled) decode still reads the whole stream, so truncation is
    # caught, at ~2/3 the cost of a full decode.
    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()


def _encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    to_l_or_rgb(im).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_image(image: bytes | Image.Image | Path, quality: int = JPEG_QUALITY) -> tuple[bytes, bool]:
    """Return ``(jpeg_bytes, kept_original)`` for file bytes, a PIL image or a path.

    Raises one of ``DECODE_ERRORS`` (Pillow's errors) for unreadable images.
    """
    if isinstance(image, Image.Image):
        return _encode_jpeg(image, quality), False
    data = image.read_bytes() if isinstance(image, Path) else image
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and im.mode in ("L", "RGB") and not needs_transpose(im):
            _verify_jpeg(im)
            return data, True
        # Re-encoding drops EXIF, so bake the orientation into the pixels first.
        return _encode_jpeg(upright(im), quality), False


def encode_record(record: Record, quality: int = JPEG_QUALITY) -> Encoded:
    """``encode_image`` of one record; a decode error becomes ``data=None`` + the reason."""
    origin = str(record.image) if isinstance(record.image, Path) else record.key
    try:
        data, kept = encode_image(record.image, quality)
    except DECODE_ERRORS as exc:
        return Encoded(record.key, record.label, None, False, f"{type(exc).__name__}: {exc}", origin)
    return Encoded(record.key, record.label, data, kept, None, origin)


def auto_workers(n: int, in_memory: bool) -> int:
    """Encoding processes for ``n`` images: 1 unless a pool pays for itself."""
    # Spawning costs ~0.5 s and pickling in-memory images costs more than encoding
    # them (mnist5k: 1.1 s in-process, 1.8 s with 2 workers), so only larger
    # directory sources get a pool.
    if in_memory or n < 2000:
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def _encode_chunk(chunk: list[Record]) -> list[Encoded]:
    return [encode_record(r) for r in chunk]


def encoded_stream(records: Sequence[Record], workers: int, chunk: int = 32) -> Iterator[Encoded]:
    """Encoded records in input order; ``workers > 1`` encodes in a process pool."""
    if workers <= 1:
        yield from map(encode_record, records)
        return
    # spawn: forking a parent that holds torch/OpenMP threads can deadlock. A bounded
    # window of chunks keeps memory flat on ImageNet-sized inputs and lets the caller
    # stop early; a worker that dies raises BrokenProcessPool instead of hanging.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque[Future[list[Encoded]]] = deque()
        starts = iter(range(0, len(records), chunk))
        try:
            for start in itertools.islice(starts, 4 * workers):
                pending.append(pool.submit(_encode_chunk, list(records[start:start + chunk])))
            while pending:
                done = pending.popleft().result()
                for start in itertools.islice(starts, 1):
                    pending.append(pool.submit(_encode_chunk, list(records[start:start + chunk])))
                yield from done
        finally:
            for future in pending:
                future.cancel()
