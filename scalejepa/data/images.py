"""Pixel modes and orientation: the one place that turns any decoded image into L or RGB.

Shared by the shard writer (which stores L or RGB JPEGs) and the decoders of the training
and evaluation pipelines (which hand RGB to the model), so an odd image looks the same on
every path: 1-bit stays grayscale, 16-bit/float grayscale is scaled to 8 bits, alpha
(RGBA, LA, transparent palette) is composited onto white, palette and CMYK/YCbCr/LAB
become RGB, and an EXIF orientation other than 1 is applied to the pixels.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DECODE_ERRORS", "EXIF_ORIENTATION", "needs_transpose", "to_l_or_rgb", "to_rgb", "upright"]

# What Pillow raises for unreadable, truncated, corrupt or oversized (decompression bomb:
# more than 2 x Image.MAX_IMAGE_PIXELS) images. Anything else is a bug and propagates.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
)
EXIF_ORIENTATION = 0x0112


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode == "F":
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        arr = np.nan_to_num(arr) * scale
    elif im.mode.startswith("I;16") or int(arr.max(initial=0)) > 255:
        arr = arr / (257.0 if int(arr.max(initial=0)) <= 65535 else arr.max() / 255.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _flatten_alpha(im: Image.Image, gray: bool) -> Image.Image:
    rgba = im.convert("LA" if gray else "RGBA")
    mode = "L" if gray else "RGB"
    white = Image.new(mode, rgba.size, 255 if gray else (255, 255, 255))
    return Image.composite(rgba.convert(mode), white, rgba.getchannel("A"))


def to_l_or_rgb(im: Image.Image) -> Image.Image:
    """L and RGB as they are; every other mode converted as the module doc says."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _high_depth_to_l(im)
    if im.mode in ("LA", "La"):
        return _flatten_alpha(im, gray=True)
    if im.mode in ("RGBA", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im, gray=False)
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, RGBX


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded image as RGB (grayscale replicated over the three channels)."""
    im = to_l_or_rgb(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def needs_transpose(im: Image.Image) -> bool:
    """Whether the image carries an EXIF orientation that rotates or mirrors it."""
    return im.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)


def upright(im: Image.Image) -> Image.Image:
    """The image with its EXIF orientation applied (itself when there is none)."""
    return ImageOps.exif_transpose(im) if needs_transpose(im) else im
