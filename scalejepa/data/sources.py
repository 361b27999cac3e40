"""Where the images of a shard build come from: an ImageFolder tree or ``builtin:NAME``.

An ImageFolder is ``DIR/<class>/**/<image>``: class index = rank of the subfolder name in
sorted order; hidden files and folders are ignored; extensions jpg jpeg png bmp webp gif
tif tiff, any case. Built-in sets are described in ``scalejepa.data.builtin``; ``split``
only applies to them. Every record gets a key that is unique, dot-free and short enough
for a ustar member name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from hashlib import sha1
from pathlib import Path

from .builtin import SPLITS, Record, builtin_records, get_builtin

__all__ = ["IMAGE_EXTENSIONS", "ShardBuildError", "SourceNotFoundError", "load_source", "scan_image_folder"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
_MAX_KEY_LEN = 90  # keeps "{key}.jpg" within the 100-byte ustar name field


class ShardBuildError(ValueError):
    """A user error in the build request (bad option, empty source, occupied --out)."""


class SourceNotFoundError(FileNotFoundError):
    """The source directory is missing or holds no images in the expected layout."""


def _sanitize_key(text: str) -> str:
    # WebDataset splits key from extension at the first dot of the basename, so keys
    # must be dot-free; slashes would become directories inside the tar.
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "img"
    if len(key) > _MAX_KEY_LEN:
        key = f"{key[:_MAX_KEY_LEN - 9]}-{sha1(text.encode()).hexdigest()[:8]}"
    return key


def _dedupe(keys: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for key in keys:
        candidate, n = key, 1
        while candidate in seen:
            candidate, n = f"{key}-{n}", n + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def _layout_help(root: Path) -> str:
    return (f"expected an ImageFolder layout: {root}/<class_name>/<image>.jpg (one "
            f"subfolder per class; extensions {' '.join(sorted(IMAGE_EXTENSIONS))})")


def _walk_images(class_dir: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return files


def scan_image_folder(root: str | os.PathLike[str]) -> tuple[list[Record], list[str]]:
    """Records (image = file path, read later) and class names of an ImageFolder tree."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise SourceNotFoundError(f"source directory {root} {problem}; {_layout_help(root)}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _walk_images(root / name)
        if not found:
            logger.warning("class folder %s holds no images (class %d kept, 0 samples)",
                           root / name, label)
        paths += found
        labels += [label] * len(found)
    if not paths:
        what = "has no class subfolders" if not classes else "has no images in its class subfolders"
        raise SourceNotFoundError(f"source directory {root} {what}; {_layout_help(root)}")
    keys = _dedupe(_sanitize_key(str(p.relative_to(root).with_suffix(""))) for p in paths)
    return [Record(k, p, y) for k, p, y in zip(keys, paths, labels)], classes


def load_source(source: str, split: str) -> tuple[list[Record], list[str], str]:
    """Records, class names and the canonical source string."""
    if split not in SPLITS:
        raise ShardBuildError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if source.startswith("builtin:"):
        name = source[len("builtin:"):]
        get_builtin(name)  # unknown names fail here, listing the available ones
        try:
            records, classes = builtin_records(name, split)
        except ValueError as exc:  # e.g. a train/val split of a set that has none
            raise ShardBuildError(str(exc)) from exc
        return records, classes, source
    if split != "all":
        raise ShardBuildError(
            f"--split {split} only applies to builtin: sources; for a directory, point "
            "--source at the split's own folder (e.g. DIR/train)"
        )
    records, classes = scan_image_folder(source)
    return records, classes, str(Path(source).expanduser().resolve())
