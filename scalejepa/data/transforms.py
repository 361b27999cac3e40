"""Image decoding and the I-JEPA crop, on raw bytes with Pillow (no torchvision).

The only augmentation I-JEPA uses is RandomResizedCrop (scale 0.3-1.0 by default, no flip,
no colour jitter). Images are returned as uint8 HWC arrays; normalisation happens on the
device after the (4x smaller) uint8 transfer, see `pipeline.normalize`. Pixel modes and
EXIF orientation are handled by `scalejepa.data.images`, as in the shard writer.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from .images import needs_transpose, to_rgb, upright

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator, ratio=RATIO
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height), the algorithm of torchvision's RandomResizedCrop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest central crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_random_crop(
    data: bytes, size: int, scale: tuple[float, float], rng: np.random.Generator, draft: bool = True
) -> np.ndarray:
    """Decode an encoded image, take a random resized crop, return (size, size, 3) uint8.

    With ``draft``, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that still
    leaves the crop at least ``size`` pixels wide and high (libjpeg's DCT scaling), which
    skips most of the decode work for large photos. Every pixel mode becomes RGB
    (``images.to_rgb``); an EXIF-rotated image is turned upright first (decoded in full).
    """
    image = Image.open(io.BytesIO(data))
    if needs_transpose(image):
        image, draft = upright(image), False
    width, height = image.size
    left, top, w, h = random_resized_crop_box(width, height, scale, rng)
    if draft and image.format == "JPEG":
        image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    else:
        box = (left, top, left + w, top + h)
    image = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image)


def eval_resize(size: int) -> int:
    """The short side the evaluation transform resizes to before its central ``size`` crop
    (size * 256 / 224: 256 for 224, as the paper's protocol)."""
    return int(round(size * 256 / 224))


def decode_center_crop(data: bytes, size: int, resize: int | None = None) -> np.ndarray:
    """Evaluation transform: resize the short side to ``resize`` (default :func:`eval_resize`),
    bilinear, then a central ``size`` crop; (size, size, 3) uint8."""
    resize = resize or eval_resize(size)
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", (resize, resize))
    image = to_rgb(upright(image))
    width, height = image.size
    factor = resize / min(width, height)
    new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))
