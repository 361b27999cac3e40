"""Write WebDataset tar shards (``{key}.jpg`` + ``{key}.cls``) and an ``index.json``.

CLI::

    scalejepa-make-shards --source DIR_OR_builtin:NAME --out DIR [--max-count N]
        [--shard-size N] [--split train|val|all] [--seed S] [--prefix NAME]
        [--workers N] [--overwrite]

Sources: an ImageFolder-style directory (``DIR/<class>/**/<image>``; class index = rank
of the subfolder name in sorted order; hidden folders are ignored; extensions jpg jpeg
png bmp webp gif tif tiff, any case) or ``builtin:NAME`` (see ``scalejepa.data.builtin``;
``--split`` only applies to these).

Images: a JPEG in L or RGB mode is stored byte-for-byte (after a reduced-size decode
that proves it is complete); its EXIF orientation is left for the loader, as with
torchvision's ImageFolder. Everything else (PNG, BMP, WebP, GIF/TIFF first frame, CMYK
JPEG, raw arrays) is re-encoded to JPEG at quality 95 after applying EXIF orientation:
L and 1-bit stay grayscale (L), 16-bit/float grayscale is scaled to 8 bits, alpha
(RGBA, LA, transparent palette) is composited onto white, palette and CMYK/YCbCr/LAB
become RGB. An image that cannot be read or decoded is skipped with a warning and
counted (``skipped`` in index.json).

Order: samples are shuffled with ``--seed`` before writing; ``--max-count`` then keeps
the first N readable ones, i.e. a seeded random subset. The same inputs and options
give byte-identical shards (tar members carry no timestamps or owners).

Atomicity: shards are written into a hidden temp folder inside ``--out`` and moved into
place at the end; index.json is removed first and written last, so an index.json never
points at half-written shards. One build per output folder at a time.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import struct
import sys
import tarfile
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime, timezone
from hashlib import sha1
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from .builtin import (
    SPLITS,
    BuiltinUnavailableError,
    Record,
    UnknownBuiltinError,
    builtin_records,
    get_builtin,
)
from .shard_index import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    ShardIndexError,
    brace_url,
    load_index,
    resolve_shards,
    shard_name,
)

__all__ = [
    "BUILTIN_RECIPE_VERSION",
    "DEFAULT_SHARD_SIZE",
    "IMAGE_EXTENSIONS",
    "JPEG_QUALITY",
    "ShardBuildError",
    "SourceNotFoundError",
    "build_shards",
    "builtin_shards",
    "default_cache_root",
    "encode_image",
    "load_index",
    "main",
    "resolve_shards",
    "scan_image_folder",
]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000
JPEG_QUALITY = 95
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
BUILTIN_RECIPE_VERSION = 1  # bump when builtin_shards' output would change
PROGRESS_SECONDS = 3.0
_TMP_PREFIX = ".scalejepa-tmp-"
_SHARD_RE = re.compile(r"^.+-\d{6}\.tar$")
_MAX_KEY_LEN = 90  # keeps "{key}.jpg" within the 100-byte ustar name field
_MAX_SKIP_RECORDS = 100  # skipped files listed in index.json (all are counted)
_MAX_SKIP_WARNINGS = 20
# What PIL raises for unreadable/corrupt files. Anything else is a bug and propagates.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error,
                  Image.DecompressionBombError)


class ShardBuildError(ValueError):
    """A user error in the build request (bad option, empty source, occupied --out)."""


class SourceNotFoundError(FileNotFoundError):
    """The source directory is missing or holds no images in the expected layout."""


class _Encoded(NamedTuple):
    key: str
    label: int
    data: bytes | None  # JPEG bytes, or None when the input was skipped
    kept: bool  # original JPEG bytes stored as they are
    error: str | None
    origin: str  # file path or key, for messages


# ----------------------------------------------------------------------------- images


def _verify_jpeg(im: Image.Image) -> None:
    # A reduced-size (DCT-scaled) decode still reads the whole stream, so truncation is
    # caught, at ~2/3 the cost of a full decode.
    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()


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


def to_jpeg_mode(im: Image.Image) -> Image.Image:
    """Convert a decoded image to L or RGB as described in the module doc."""
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


def _encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    to_jpeg_mode(im).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_image(image: bytes | Image.Image | Path, quality: int = JPEG_QUALITY) -> tuple[bytes, bool]:
    """Return ``(jpeg_bytes, kept_original)`` for file bytes, a PIL image or a path.

    Raises OSError/ValueError/SyntaxError (PIL's errors) for unreadable images.
    """
    if isinstance(image, Image.Image):
        return _encode_jpeg(image, quality), False
    data = image.read_bytes() if isinstance(image, Path) else image
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and im.mode in ("L", "RGB"):
            _verify_jpeg(im)
            return data, True
        # Re-encoding drops EXIF, so bake the orientation into the pixels first.
        return _encode_jpeg(ImageOps.exif_transpose(im), quality), False


def _encode_record(record: Record, quality: int = JPEG_QUALITY) -> _Encoded:
    origin = str(record.image) if isinstance(record.image, Path) else record.key
    try:
        data, kept = encode_image(record.image, quality)
    except _DECODE_ERRORS as exc:
        return _Encoded(record.key, record.label, None, False, f"{type(exc).__name__}: {exc}", origin)
    return _Encoded(record.key, record.label, data, kept, None, origin)


# ---------------------------------------------------------------------------- sources


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


def _load_source(source: str, split: str) -> tuple[list[Record], list[str], str]:
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


# ----------------------------------------------------------------------------- output


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_our_index(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``, or make sure it is empty / a previous shard set of ours."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardBuildError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    has_tmp = any(e.name.startswith(_TMP_PREFIX) for e in entries)
    index = out_dir / INDEX_NAME
    ours = (index.is_file() and _is_our_index(index)) or (has_tmp and not index.exists())
    foreign = [e.name for e in entries
               if not (e.name == INDEX_NAME or e.name.startswith(_TMP_PREFIX)
                       or (e.is_file() and _SHARD_RE.match(e.name)))]
    if entries and (foreign or not ours) and not overwrite:
        shown = ", ".join(sorted(foreign or [e.name for e in entries])[:5])
        raise ShardBuildError(
            f"output directory {out_dir} is not empty and does not hold a scalejepa shard "
            f"set (found: {shown}); choose an empty directory or pass --overwrite"
        )
    for entry in entries:  # leftovers of crashed builds; live builds keep theirs
        pid = entry.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if entry.name.startswith(_TMP_PREFIX) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (no mtime/owner) makes shards reproducible byte for byte.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Writes samples into ``{prefix}-NNNNNN.tar`` files, ``shard_size`` per file."""

    def __init__(self, directory: Path, prefix: str, shard_size: int) -> None:
        self.directory, self.prefix, self.shard_size = directory, prefix, shard_size
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        if self._tar is None:
            name = shard_name(self.prefix, len(self.shards))
            self._tar = tarfile.open(self.directory / name, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "samples": 0})
        _tar_add(self._tar, f"{key}.jpg", jpeg)
        _tar_add(self._tar, f"{key}.cls", str(label).encode("ascii"))
        self.shards[-1]["samples"] += 1
        if self.shards[-1]["samples"] == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            last = self.shards[-1]
            last["bytes"] = (self.directory / last["name"]).stat().st_size


def _publish(tmp: Path, out_dir: Path, index: dict[str, Any]) -> Path:
    """Move finished shards from ``tmp`` into ``out_dir``; index.json goes last."""
    final_index = out_dir / INDEX_NAME
    old_names: set[str] = set()
    if final_index.is_file():
        if _is_our_index(final_index):
            old = json.loads(final_index.read_text(encoding="utf-8"))
            old_names = {s["name"] for s in old.get("shards", []) if isinstance(s, dict)
                         and isinstance(s.get("name"), str) and "/" not in s["name"]}
        final_index.unlink()  # from here on, no index points at shards being replaced
    new_names = {s["name"] for s in index["shards"]}
    stale_same_prefix = {p.name for p in out_dir.glob(f"{index['prefix']}-*.tar")
                         if _SHARD_RE.match(p.name)}
    for name in (old_names | stale_same_prefix) - new_names:
        (out_dir / name).unlink(missing_ok=True)
    for name in sorted(new_names):
        os.replace(tmp / name, out_dir / name)
    tmp_index = tmp / INDEX_NAME
    tmp_index.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_index, final_index)
    return final_index


# ------------------------------------------------------------------------------ build


def _auto_workers(n: int, in_memory: bool) -> int:
    # Spawning costs ~0.5 s and pickling in-memory images costs more than encoding
    # them (mnist5k: 1.1 s in-process, 1.8 s with 2 workers), so only larger
    # directory sources get a pool.
    if in_memory or n < 2000:
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def _encode_chunk(chunk: list[Record]) -> list[_Encoded]:
    return [_encode_record(r) for r in chunk]


def _encoded_stream(records: Sequence[Record], workers: int, chunk: int = 32) -> Iterator[_Encoded]:
    """Encoded records in input order; ``workers > 1`` encodes in a process pool."""
    if workers <= 1:
        yield from map(_encode_record, records)
        return
    # spawn: forking a parent that holds torch/OpenMP threads can deadlock. A bounded
    # window of chunks keeps memory flat on ImageNet-sized inputs and lets the caller
    # stop early; a worker that dies raises BrokenProcessPool instead of hanging.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque[Future[list[_Encoded]]] = deque()
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


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.start, self.last = total, time.monotonic(), time.monotonic()

    def update(self, done: int, skipped: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            logger.info("%d/%d (%.0f%%) %.0f img/s, %d skipped", done, self.total,
                        100.0 * done / max(self.total, 1), rate, skipped)


def _write_shards(records: Sequence[Record], tmp: Path, prefix: str, shard_size: int,
                  max_count: int, workers: int) -> dict[str, Any]:
    """Encode and write; returns the per-shard table and counters."""
    writer = _ShardWriter(tmp, prefix, shard_size)
    progress = _Progress(min(max_count, len(records)))
    written = kept = 0
    skipped: list[dict[str, str]] = []
    n_skipped = 0
    labels: list[int] = []
    stream = _encoded_stream(records, workers)
    try:
        for enc in stream:
            if enc.data is None:
                n_skipped += 1
                if n_skipped <= _MAX_SKIP_WARNINGS:
                    logger.warning("skipping unreadable image %s (%s)", enc.origin, enc.error)
                if len(skipped) < _MAX_SKIP_RECORDS:
                    skipped.append({"source": enc.origin, "error": str(enc.error)})
            else:
                writer.write(enc.key, enc.data, enc.label)
                written, kept = written + 1, kept + enc.kept
                labels.append(enc.label)
            progress.update(written, n_skipped)
            if written >= max_count:
                break  # backfills skipped images from the rest of the shuffled order
    finally:
        stream.close()  # stops the worker pool when we break early
        writer.close()
    if n_skipped > _MAX_SKIP_WARNINGS:
        logger.warning("%d unreadable images skipped in total", n_skipped)
    return {"shards": writer.shards, "samples": written, "kept_jpeg": kept,
            "reencoded": written - kept, "skipped": n_skipped,
            "skipped_files": skipped, "labels": labels}


def _shuffled(records: list[Record], seed: int) -> list[Record]:
    order = list(records)
    random.Random(seed).shuffle(order)
    return order


def _check_options(shard_size: int, max_count: int | None, prefix: str) -> None:
    if shard_size < 1:
        raise ShardBuildError(f"shard size must be >= 1, got {shard_size}")
    if max_count is not None and max_count < 1:
        raise ShardBuildError(f"max count must be >= 1, got {max_count}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
        raise ShardBuildError(f"prefix {prefix!r} must be a plain file-name stem ([A-Za-z0-9_.-])")


def _build(source: tuple[list[Record], list[str], str], out_dir: Path, url_dir: Path, *,
           max_count: int | None, shard_size: int, split: str, seed: int, prefix: str,
           workers: int | None) -> dict[str, Any]:
    """Write ``source`` (from ``_load_source``) into ``out_dir`` (already checked);
    the index url points at ``url_dir``."""
    records, classes, canonical = source
    order = _shuffled(records, seed)
    cap = len(order) if max_count is None else max_count
    in_memory = not any(isinstance(r.image, Path) for r in order[:1])
    n_workers = _auto_workers(min(cap, len(order)), in_memory) if workers is None else workers
    tmp = out_dir / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        result = _write_shards(order, tmp, prefix, shard_size, cap, n_workers)
        if result["samples"] == 0:
            raise ShardBuildError(
                f"no readable images in {canonical} ({result['skipped']} skipped, first: "
                f"{result['skipped_files'][0] if result['skipped_files'] else 'none'})"
            )
        counts = np.bincount(np.asarray(result.pop("labels")), minlength=len(classes))
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": canonical,
            "split": split,
            "seed": seed,
            "max_count": max_count,
            "shard_size": shard_size,
            "prefix": prefix,
            "jpeg_quality": JPEG_QUALITY,
            "samples": result["samples"],
            "skipped": result["skipped"],
            "kept_jpeg": result["kept_jpeg"],
            "reencoded": result["reencoded"],
            "classes": classes,
            "class_counts": [int(c) for c in counts],
            "bytes": sum(s["bytes"] for s in result["shards"]),
            "url": brace_url(url_dir, prefix, len(result["shards"])),
            "shards": result["shards"],
            "skipped_files": result["skipped_files"],
        }
        _publish(tmp, out_dir, index)
    finally:
        # Best effort: a leftover temp folder holds no index and is removed next build.
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def build_shards(source: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 max_count: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                 split: str = "all", seed: int = 0, *, prefix: str = "shard",
                 overwrite: bool = False, workers: int | None = None) -> Path:
    """Build a shard set from a directory or ``builtin:NAME``; returns index.json's path.

    ``workers=None`` encodes in-process, except for directory sources of 2,000 images
    or more, which get a process pool (spawn, up to 8). See the module doc for the
    image and output rules.
    """
    out = Path(out_dir).expanduser().resolve()
    _check_options(shard_size, max_count, prefix)
    loaded = _load_source(os.fspath(source), split)  # source errors before touching --out
    _check_out_dir(out, overwrite)
    _build(loaded, out, out, max_count=max_count, shard_size=shard_size, split=split,
           seed=seed, prefix=prefix, workers=workers)
    return out / INDEX_NAME


# ----------------------------------------------------------------------- builtin cache


def default_cache_root() -> Path:
    """``$SCALEJEPA_CACHE/shards``, else ``$XDG_CACHE_HOME/scalejepa/shards``, else
    ``~/.cache/scalejepa/shards``."""
    if os.environ.get("SCALEJEPA_CACHE"):
        return Path(os.environ["SCALEJEPA_CACHE"]).expanduser() / "shards"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "scalejepa" / "shards"


def _builtin_shard_size(n: int) -> int:
    # ~16 shards per set so that ranks x workers up to 16 all get data, >= 32 per shard.
    return max(32, math.ceil(n / 16))


def builtin_shards(name: str, split: str = "train", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Shards of a built-in set, built once into ``<cache>/<name>-<split>-v1``.

    Returns the path of its index.json. Concurrent callers each build into their own
    temp folder and rename it into place; the first rename wins, the others discard
    theirs. A cached set that fails validation is rebuilt.
    """
    get_builtin(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final = (root / f"{name}-{split}-v{BUILTIN_RECIPE_VERSION}").resolve()
    if final.exists():
        try:
            load_index(final)
            return final / INDEX_NAME
        except (ShardIndexError, FileNotFoundError) as exc:
            logger.warning("rebuilding broken shard cache %s: %s", final, exc)
            stale = final.with_name(f".{final.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(final, stale)
            shutil.rmtree(stale)
    loaded = _load_source(f"builtin:{name}", split)  # validates split before any writing
    root.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _build(loaded, tmp, final, max_count=None, shard_size=_builtin_shard_size(len(loaded[0])),
               split=split, seed=0, prefix=split, workers=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX_NAME).is_file():
                raise
            logger.info("another process built %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when our rename won
    load_index(final)
    return final / INDEX_NAME


# -------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scalejepa-make-shards",
        description="Write WebDataset tar shards ({key}.jpg + {key}.cls) and index.json "
                    "from an ImageFolder directory or a built-in image set.",
    )
    p.add_argument("--source", required=True,
                   help="ImageFolder directory (DIR/<class>/<image>) or builtin:NAME "
                        "(mnist5k, lfw-subset, skimage-photos)")
    p.add_argument("--out", required=True, help="output directory for shards and index.json")
    p.add_argument("--max-count", type=int, default=None,
                   help="keep at most N samples (a seeded random subset)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="split of a builtin: source (default all)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    p.add_argument("--workers", type=int, default=None,
                   help="encoding processes (default: 1 for builtin: sources and "
                        "directories under 2,000 images, else up to 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not a previous shard set")
    return p


def _summary(index_path: Path, seconds: float) -> str:
    index = json.loads(index_path.read_text(encoding="utf-8"))
    n, shards = index["samples"], len(index["shards"])
    return "\n".join([
        f"wrote {n} samples in {shards} shard(s), {len(index['classes'])} classes, "
        f"{index['bytes'] / 1e6:.1f} MB",
        f"  index: {index_path}",
        f"  url:   {index['url']}",
        f"  JPEG kept as-is: {index['kept_jpeg']}, re-encoded: {index['reencoded']}, "
        f"skipped (unreadable): {index['skipped']}",
        f"  took {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} img/s)",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for user errors)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="make-shards: %(message)s", stream=sys.stderr)
    start = time.monotonic()
    try:
        index_path = build_shards(args.source, args.out, max_count=args.max_count,
                                  shard_size=args.shard_size, split=args.split, seed=args.seed,
                                  prefix=args.prefix, overwrite=args.overwrite,
                                  workers=args.workers)
    except (ShardBuildError, SourceNotFoundError, UnknownBuiltinError,
            BuiltinUnavailableError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except OSError as exc:  # disk full, permissions: a message, not a traceback
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    print(_summary(index_path, time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
