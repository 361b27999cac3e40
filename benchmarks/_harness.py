"""The harness of a benchmark that measures several named variants in one run
(``train_step.py``): each variant in a process of its own (isolation: an out-of-memory
error or a crashed kernel cannot affect the next), a time budget after which no further
variant starts, the results JSON saved after every variant (a run killed by its budget
keeps what it measured), and a later run that measures the pending variants into the same
file (``--resume-json``). The benchmark brings what is its own: how to measure one variant,
the environment a variant runs under, and how to save its report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import output_path, progress

# Options the parent sets per child (with a value), and flags it drops.
_PER_CHILD_OPTIONS = ("--variants", "--child-out", "--resume-json", "--time-budget")
_PARENT_FLAGS = ("--isolate", "--no-isolate", "--retry-errors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness's options: which variants, isolation, budgets, resume."""
    parser.add_argument("--variants", default="all", help="comma list of variant names, or 'all'")
    parser.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                        help="each variant in its own process (default on a GPU)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--variant-timeout", type=int, default=1200, help="seconds per isolated variant")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="start no further variant after this many seconds (the first always runs); the rest "
                             "stay 'pending' for --resume-json")
    parser.add_argument("--resume-json", type=Path, default=None, metavar="PATH|latest",
                        help="continue an unfinished run: measure its pending variants into the same JSON")
    parser.add_argument("--retry-errors", action="store_true", help="with --resume-json: re-run variants that failed")
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)


def child_argv(argv: list[str]) -> list[str]:
    """The parent's arguments minus those the parent sets per child."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _PER_CHILD_OPTIONS:
            skip = True
        elif arg not in _PARENT_FLAGS and not arg.startswith(tuple(f"{o}=" for o in _PER_CHILD_OPTIONS)):
            out.append(arg)
    return out


def run_isolated(script: Path, argv: list[str], name: str, timeout: int, env: dict) -> dict:
    """Variant ``name`` measured by ``script`` in a child process (``--child-out``); its
    JSON result, or an error record."""
    with tempfile.TemporaryDirectory(prefix="bench-variant-") as tmp:
        out = Path(tmp) / "variant.json"
        cmd = [sys.executable, str(script), *child_argv(argv), "--variants", name, "--child-out", str(out),
               "--no-isolate"]
        try:
            proc = subprocess.run(cmd, timeout=timeout, stderr=subprocess.PIPE, text=True, env=env)
        except subprocess.TimeoutExpired:
            return {"variant": name, "error": f"timed out after {timeout} s (--variant-timeout)"}
        sys.stderr.write(proc.stderr[-4000:])
        if out.is_file():
            return json.loads(out.read_text())
        return {"variant": name, "error": f"child process exited with {proc.returncode} and no result: "
                                          f"{proc.stderr.strip()[-1500:]}"}


def run_pending(args, results: dict, json_path: Path, *, script: Path, argv: list[str],
                measure: Callable[[str], dict], env_of: Callable[[str], dict],
                save: Callable[[dict, Path], None]) -> None:
    """Measure ``results["pending"]`` in order (in child processes with ``--isolate``),
    saving after every variant, until the time budget is spent."""
    start, ran = time.perf_counter(), 0
    for name in list(results["pending"]):
        if ran and args.time_budget and time.perf_counter() - start > args.time_budget:
            progress(f"time budget of {args.time_budget} s spent: {', '.join(results['pending'])} left for "
                     f"--resume-json {json_path}")
            break
        if args.isolate:
            progress(f"variant {name}: child process")
            result = run_isolated(script, argv, name, args.variant_timeout, env_of(name))
            if "error" in result:
                progress(f"  {name}: not measured ({result['error'].splitlines()[0][:200]})")
        else:
            result = measure(name)
        results["variants"].append(result)
        results["pending"].remove(name)
        ran += 1
        save(results, json_path)


def resume(args, benchmark: str, fresh: dict, names: list[str]) -> tuple[Path, dict, list[str]]:
    """(results path, results, variants still to measure) of the run to continue:
    ``--resume-json PATH``, or ``latest`` (the newest ``<benchmark>_*.json`` in --out-dir
    with pending variants; a fresh run if there is none). Same settings and device
    required; measured variants are kept (failed ones re-run with --retry-errors)."""
    path = args.resume_json
    if str(path) == "latest":
        candidates = sorted(args.out_dir.glob(f"{benchmark}_{'smoke_' if args.smoke else ''}2*.json"))
        candidates = [p for p in candidates if json.loads(p.read_text()).get("pending")]
        if not candidates:
            progress(f"--resume-json latest: no unfinished run in {args.out_dir}; starting a new one")
            return output_path(args.out_dir, benchmark, fresh["env"], args.smoke), fresh, names
        path = candidates[-1]
    old = json.loads(Path(path).read_text())
    mismatch = {k: (old["settings"].get(k), v) for k, v in fresh["settings"].items()
                if k != "isolate" and old["settings"].get(k) != v}
    if mismatch or old["env"]["device"] != fresh["env"]["device"]:
        sys.exit(f"--resume-json {path}: settings or device differ from this run ({mismatch or old['env']['device']}); "
                 "start a new run instead")
    old.setdefault("resumed", []).append(fresh["env"]["timestamp_utc"])
    if args.variants == "all":
        names = old.get("pending", []) + [n for n in names if n not in old.get("pending", [])]
    done = {v["variant"] for v in old["variants"] if "error" not in v or not args.retry_errors}
    old["variants"] = [v for v in old["variants"] if v["variant"] in done]
    return Path(path), old, [n for n in names if n not in done]

