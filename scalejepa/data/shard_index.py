"""Reading shard sets written by ``scalejepa-make-shards``: ``index.json`` and shard URLs.

A pure reader: it writes nothing and imports nothing of the writer, so that training
and evaluation code can resolve shard lists cheaply (no PIL/webdataset imports;
``braceexpand`` is imported only when a brace URL is expanded). ``builtin:`` specs need
the cache that builds them: ``scalejepa.data.cache.resolve_shards`` passes it in.

What is checked before any sample is read: the index is valid JSON of this format, its
per-shard sample counts add up to ``samples``, every shard it lists exists, and every
shard has the size recorded in ``bytes`` (a truncated or replaced tar is caught here).
Sample counts inside the tars are trusted, not recounted (that would read every header).

``index.json`` (``format_version`` 1) holds at least::

    format          "scalejepa-shards"
    format_version  1
    created         UTC time, ISO 8601 ("2026-01-01T12:00:00Z")
    source          "builtin:NAME" or the absolute source directory
    split, seed, max_count, shard_size, prefix
    samples         total number of samples
    skipped         unreadable input images that were left out
    classes         class names; a sample's .cls is its index in this list
    class_counts    samples per class
    bytes           total size of the shard files
    url             brace URL covering all shards, absolute ("DIR/shard-{000000..000003}.tar")
    shards          [{"name": "shard-000000.tar", "samples": 1000, "bytes": 123456}, ...]
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "REMOTE_PREFIXES",
    "ShardIndexError",
    "brace_url",
    "is_shard_index",
    "load_index",
    "rebuild_hint",
    "resolve_shards",
    "shard_name",
]

FORMAT = "scalejepa-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://")
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "samples": int,
    "shards": list,
    "classes": list,
    "url": str,
    "source": str,
    "created": str,
}


class ShardIndexError(ValueError):
    """index.json is malformed, or disagrees with the shard files next to it."""


BuiltinResolver = Callable[[str, str], Path]  # (name, split) -> path of that set's index.json


def shard_name(prefix: str, i: int) -> str:
    """File name of shard ``i``; six digits so that a brace range covers them all."""
    return f"{prefix}-{i:06d}.tar"


def brace_url(directory: Path, prefix: str, n_shards: int) -> str:
    """Absolute brace URL covering shards ``0 .. n_shards-1`` of ``directory``."""
    last = max(n_shards - 1, 0)
    return f"{Path(directory).resolve()}/{prefix}-{{{0:06d}..{last:06d}}}.tar"


def rebuild_hint(index: dict[str, Any], directory: Path) -> str:
    """A command line that rebuilds this shard set."""
    parts = ["scalejepa-make-shards", "--source", str(index.get("source", "SOURCE")),
             "--out", str(directory)]
    for opt in ("split", "seed", "max_count", "shard_size", "prefix"):
        value = index.get(opt)
        if value is not None:
            parts += [f"--{opt.replace('_', '-')}", str(value)]
    return shlex.join(parts) + " --overwrite"


def is_shard_index(path: Path) -> bool:
    """Whether ``path`` is a readable JSON file that says it is a shard index of ours."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _validate(index: Any, path: Path) -> None:
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardIndexError(f"{path} is not a {FORMAT} index (missing 'format': {FORMAT!r})")
    for key, typ in _REQUIRED.items():
        if not isinstance(index.get(key), typ):
            raise ShardIndexError(f"{path}: field {key!r} is missing or not {typ}")
    if index["format_version"] > FORMAT_VERSION:
        raise ShardIndexError(
            f"{path}: format_version {index['format_version']} is newer than this "
            f"scalejepa understands ({FORMAT_VERSION}); upgrade scalejepa"
        )
    for shard in index["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str)
                and isinstance(shard.get("samples"), int) and shard["samples"] >= 0):
            raise ShardIndexError(f"{path}: bad shard entry {shard!r}")
        if "/" in shard["name"] or shard["name"] in ("", ".", ".."):
            raise ShardIndexError(f"{path}: shard name {shard['name']!r} is not a file name")
    total = sum(s["samples"] for s in index["shards"])
    if total != index["samples"]:
        raise ShardIndexError(
            f"{path}: 'samples' is {index['samples']} but the shards hold {total}"
        )


def load_index(path_or_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``index.json`` (or a directory holding it).

    Checks that every shard file exists with the recorded size. The returned dict adds
    ``dir`` (absolute directory), ``urls`` (absolute shard paths, in order) and sets
    ``url`` to the directory's actual location, so a moved shard set still works.
    """
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        tars = sorted(path.parent.glob("*.tar")) if path.parent.is_dir() else []
        also = (f", or pass the {len(tars)} tar file(s) there as a brace URL or a comma list"
                if tars else "")
        raise FileNotFoundError(
            f"no shard index at {path}; build one with "
            f"'scalejepa-make-shards --source DIR_OR_builtin:NAME --out {path.parent}'{also}"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardIndexError(f"{path} is not valid JSON: {exc}") from exc
    _validate(index, path)
    directory = path.parent.resolve()
    urls = []
    for shard in index["shards"]:
        shard_path = directory / shard["name"]
        if not shard_path.is_file():
            raise FileNotFoundError(
                f"shard {shard_path} listed in {path} is missing; rebuild with: "
                f"{rebuild_hint(index, directory)}"
            )
        expected = shard.get("bytes")
        if isinstance(expected, int) and shard_path.stat().st_size != expected:
            raise ShardIndexError(
                f"shard {shard_path} has {shard_path.stat().st_size} bytes, index.json "
                f"says {expected} (truncated or replaced?); rebuild with: "
                f"{rebuild_hint(index, directory)}"
            )
        urls.append(str(shard_path))
    index["dir"] = str(directory)
    index["urls"] = urls
    if index["shards"]:
        index["url"] = brace_url(directory, *_prefix_and_count(index))
    return index


def _prefix_and_count(index: dict[str, Any]) -> tuple[str, int]:
    prefix = index.get("prefix")
    if not isinstance(prefix, str):
        prefix = index["shards"][0]["name"].rsplit("-", 1)[0]
    return prefix, len(index["shards"])


def _expand(spec: str) -> list[str]:
    if "{" not in spec:
        return [spec]
    import braceexpand  # webdataset dependency; imported late to keep this module light

    return list(braceexpand.braceexpand(spec))


def _strip_file_scheme(spec: str) -> str:
    for scheme in ("file://", "file:"):
        if spec.startswith(scheme):
            return spec[len(scheme):]
    return spec


def _resolve_one(spec: str, builtin: BuiltinResolver | None) -> tuple[list[str], dict[str, Any] | None]:
    if spec.startswith(REMOTE_PREFIXES):
        return _expand(spec), None  # remote: cannot (and should not) be checked here
    if spec.startswith("builtin:"):
        if builtin is None:
            raise ValueError(f"shard spec {spec!r}: builtin: sets are resolved by "
                             "scalejepa.data.cache.resolve_shards, which builds them")
        name, _, split = spec[len("builtin:"):].partition(":")
        index = load_index(builtin(name, split or "train"))
        return list(index["urls"]), index
    local = Path(_strip_file_scheme(spec)).expanduser()
    if local.is_dir() or local.suffix == ".json":
        index = load_index(local)
        return list(index["urls"]), index
    urls = [str(Path(u).resolve()) for u in _expand(str(local))]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"shard file {missing[0]} does not exist{more} (from {spec!r}); build shards "
            "with 'scalejepa-make-shards --source DIR_OR_builtin:NAME --out DIR'"
        )
    return urls, None


def _split_top_level(spec: str) -> list[str]:
    """Split at commas outside braces, so ``a-{0,1}.tar,b.tar`` gives two parts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def resolve_shards(spec: str, builtin: BuiltinResolver | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """Turn a shard spec into a list of URLs (and the index, when there is exactly one).

    ``spec`` is a directory holding index.json, a path to an index.json, a brace URL
    (``/data/train-{000000..000009}.tar``), a single .tar path, ``builtin:NAME[:SPLIT]``
    (built once into the cache, split defaults to train), or a comma-separated list of
    these. Local paths are made absolute and must exist; remote URLs (http(s)://,
    pipe:, s3://, gs://, ais://) are brace-expanded and passed through unchecked.
    ``builtin`` maps (name, split) to a built-in set's index.json (see the module doc).
    """
    parts = _split_top_level(spec)
    if not parts:
        raise ValueError(f"empty shard spec {spec!r}")
    urls: list[str] = []
    indexes: list[dict[str, Any] | None] = []
    for part in parts:
        part_urls, index = _resolve_one(part, builtin)
        urls += part_urls
        indexes.append(index)
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls, indexes[0] if len(indexes) == 1 else None
