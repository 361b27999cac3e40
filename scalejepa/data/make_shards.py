"""The ``scalejepa-make-shards`` command: write WebDataset tar shards and an index.json.

CLI::

    scalejepa-make-shards --source DIR_OR_builtin:NAME --out DIR [--max-count N]
        [--shard-size N] [--split train|val|all] [--seed S] [--prefix NAME]
        [--workers N] [--overwrite]

Sources: ``scalejepa.data.sources`` (an ImageFolder directory or ``builtin:NAME``;
``--split`` only applies to the latter). Image rules: ``scalejepa.data.encode``. Order,
determinism and atomicity of the output: ``scalejepa.data.writer``. Exit status 2 for a
bad request (unknown source, occupied --out, bad option), 1 for a system error (disk
full, permissions), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .builtin import SPLITS, BuiltinUnavailableError, UnknownBuiltinError
from .sources import ShardBuildError, SourceNotFoundError
from .writer import DEFAULT_SHARD_SIZE, build_shards

__all__ = ["main"]


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
