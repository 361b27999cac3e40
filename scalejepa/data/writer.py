"""Write a shard set: WebDataset tars (``{key}.jpg`` + ``{key}.cls``) and ``index.json``.

Order: samples are shuffled with ``seed`` before writing; ``max_count`` then keeps the
first N readable ones, i.e. a seeded random subset. The same inputs and options give
byte-identical shards (tar members carry no timestamps or owners). Images go through
``scalejepa.data.encode``; one that cannot be read is skipped with a warning and counted
(``skipped`` in index.json; the first ``_MAX_SKIP_RECORDS`` are listed in
``skipped_files``). A source with no readable image at all is a ``ShardBuildError``.

Atomicity: shards are written (and fsynced) into a hidden temp folder inside the output
folder and moved into place at the end; index.json is removed first and written last
(``scalejepa.io.atomic_write_text``), so an index.json never points at half-written
shards. One build per output folder at a time; leftovers of crashed builds (their pid is
gone) are removed by the next build.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tarfile
import time
import uuid
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import numpy as np

from scalejepa.io import atomic_write_text, fsync_dir

from .builtin import Record
from .encode import JPEG_QUALITY, auto_workers, encoded_stream
from .shard_index import FORMAT, FORMAT_VERSION, INDEX_NAME, brace_url, is_shard_index, shard_name
from .sources import ShardBuildError, load_source

__all__ = ["DEFAULT_SHARD_SIZE", "ShardBuildError", "build_shards", "write_shard_set"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000
PROGRESS_SECONDS = 3.0
_TMP_PREFIX = ".scalejepa-tmp-"
_INDEX_TMP_PREFIX = f".{INDEX_NAME}.tmp-"  # atomic_write_text's temp file next to index.json
_SHARD_RE = re.compile(r"^.+-\d{6}\.tar$")
_MAX_SKIP_RECORDS = 100  # skipped files listed in index.json (all are counted)
_MAX_SKIP_WARNINGS = 20

Source = tuple[list[Record], list[str], str]  # records, class names, canonical source (load_source)


# ----------------------------------------------------------------------------- output folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftover_pid(name: str) -> str | None:
    """The pid in the name of a temp entry of ours, None for any other entry."""
    for prefix in (_TMP_PREFIX, _INDEX_TMP_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):].split("-", 1)[0]
    return None


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``, or make sure it is empty / a previous shard set of ours."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardBuildError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    has_tmp = any(_leftover_pid(e.name) is not None for e in entries)
    index = out_dir / INDEX_NAME
    ours = (index.is_file() and is_shard_index(index)) or (has_tmp and not index.exists())
    foreign = [e.name for e in entries
               if not (e.name == INDEX_NAME or _leftover_pid(e.name) is not None
                       or (e.is_file() and _SHARD_RE.match(e.name)))]
    if entries and (foreign or not ours) and not overwrite:
        shown = ", ".join(sorted(foreign or [e.name for e in entries])[:5])
        raise ShardBuildError(
            f"output directory {out_dir} is not empty and does not hold a scalejepa shard "
            f"set (found: {shown}); choose an empty directory or pass --overwrite"
        )
    for entry in entries:  # leftovers of crashed builds; live builds keep theirs
        pid = _leftover_pid(entry.name)
        if pid is not None and pid.isdigit() and not _pid_alive(int(pid)):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- tar files


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (no mtime/owner) makes shards reproducible byte for byte.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, BytesIO(data))


class _ShardWriter:
    """Writes samples into ``{prefix}-NNNNNN.tar`` files, ``shard_size`` per file."""

    def __init__(self, directory: Path, prefix: str, shard_size: int) -> None:
        self.directory, self.prefix, self.shard_size = directory, prefix, shard_size
        self.shards: list[dict[str, Any]] = []
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        if self._tar is None:
            name = shard_name(self.prefix, len(self.shards))
            self._file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in close()
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "samples": 0})
        _tar_add(self._tar, f"{key}.jpg", jpeg)
        _tar_add(self._tar, f"{key}.cls", str(label).encode("ascii"))
        self.shards[-1]["samples"] += 1
        if self.shards[-1]["samples"] == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._tar is None or self._file is None:
            return
        try:
            self._tar.close()  # writes the end-of-archive blocks; leaves the file open
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before index.json can point at it
        finally:
            self._file.close()
            self._tar = self._file = None
        last = self.shards[-1]
        last["bytes"] = (self.directory / last["name"]).stat().st_size


def _publish(tmp: Path, out_dir: Path, index: dict[str, Any]) -> Path:
    """Move finished shards from ``tmp`` into ``out_dir``; index.json goes last."""
    final_index = out_dir / INDEX_NAME
    old_names: set[str] = set()
    if final_index.is_file():
        if is_shard_index(final_index):
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
    fsync_dir(out_dir)  # the shards' renames are durable before the index names them
    atomic_write_text(final_index, json.dumps(index, indent=1) + "\n")
    return final_index


# ----------------------------------------------------------------------------- build


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


def _write_shards(records: list[Record], tmp: Path, prefix: str, shard_size: int,
                  max_count: int, workers: int) -> dict[str, Any]:
    """Encode and write; returns the per-shard table and counters."""
    writer = _ShardWriter(tmp, prefix, shard_size)
    progress = _Progress(min(max_count, len(records)))
    written = kept = 0
    skipped: list[dict[str, str]] = []
    n_skipped = 0
    labels: list[int] = []
    stream = encoded_stream(records, workers)
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


def write_shard_set(source: Source, out_dir: Path, url_dir: Path, *, max_count: int | None,
                    shard_size: int, split: str, seed: int, prefix: str,
                    workers: int | None) -> dict[str, Any]:
    """Write ``source`` (from ``load_source``) into ``out_dir`` (already checked);
    the index url points at ``url_dir``. Returns the index written."""
    records, classes, canonical = source
    order = _shuffled(records, seed)
    cap = len(order) if max_count is None else max_count
    in_memory = not any(isinstance(r.image, Path) for r in order[:1])
    n_workers = auto_workers(min(cap, len(order)), in_memory) if workers is None else workers
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
    output rules and ``scalejepa.data.encode`` for the image rules.
    """
    out = Path(out_dir).expanduser().resolve()
    _check_options(shard_size, max_count, prefix)
    loaded = load_source(os.fspath(source), split)  # source errors before touching --out
    _check_out_dir(out, overwrite)
    write_shard_set(loaded, out, out, max_count=max_count, shard_size=shard_size, split=split,
                    seed=seed, prefix=prefix, workers=workers)
    return out / INDEX_NAME
