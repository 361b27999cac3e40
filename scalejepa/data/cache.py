"""Shard sets of the built-in image sets, built once into a per-user cache.

``builtin_shards(name, split)`` returns ``<cache>/<name>-<split>-v<BUILTIN_RECIPE_VERSION>/
index.json``, building it on first use. ``resolve_shards`` is
``scalejepa.data.shard_index.resolve_shards`` with ``builtin:NAME[:SPLIT]`` specs
served from this cache: the entry point for code that takes a user's shard spec.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from scalejepa.io import fsync_dir

from . import shard_index
from .builtin import get_builtin
from .shard_index import INDEX_NAME, ShardIndexError, load_index
from .sources import load_source
from .writer import write_shard_set

__all__ = ["BUILTIN_RECIPE_VERSION", "builtin_shards", "default_cache_root", "resolve_shards"]

logger = logging.getLogger(__name__)

BUILTIN_RECIPE_VERSION = 1  # bump when builtin_shards' output would change


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
    loaded = load_source(f"builtin:{name}", split)  # validates split before any writing
    root.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write_shard_set(loaded, tmp, final, max_count=None, shard_size=_builtin_shard_size(len(loaded[0])),
                        split=split, seed=0, prefix=split, workers=1)
        try:
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except OSError:
            if not (final / INDEX_NAME).is_file():
                raise
            logger.info("another process built %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when our rename won
    load_index(final)
    return final / INDEX_NAME


def resolve_shards(spec: str) -> tuple[list[str], dict[str, Any] | None]:
    """``shard_index.resolve_shards(spec)``, building ``builtin:`` parts into the cache."""
    return shard_index.resolve_shards(spec, builtin=builtin_shards)
