"""Shared plumbing of the benchmark scripts: environment metadata, result files, progress lines.

Every results JSON carries ``env`` (:func:`environment`): device name, torch / triton / CUDA
versions, UTC date and time, git commit (and whether the work tree had local changes), CPU
count and load average (the CPU is shared on CI-like machines: a high load means noisy
timings). Files are named ``<name>[_smoke]_<UTC stamp>.{json,md,png}``.

Imports only the standard library, torch and ``scalejepa.io``: the GPU machines lack
webdataset, braceexpand and deepspeed, and the synthetic benchmark paths must run there.
:func:`write_report` is every script's writer of its ``.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
_START = time.perf_counter()


def ensure_importable() -> None:
    """Let ``scalejepa`` (and ``scalejepa.kernels``, which lives in ``kernels/``) import
    from a plain checkout that was not pip-installed (e.g. a bare GPU machine). Imports
    no kernel: TRITON_INTERPRET must be settled before ``scalejepa.kernels`` is imported."""
    import importlib.util

    if importlib.util.find_spec("scalejepa") is None:
        sys.path.insert(0, str(REPO))
    if importlib.util.find_spec("scalejepa.kernels") is None:
        import scalejepa

        scalejepa.__path__.append(str(REPO))  # resolves scalejepa.kernels -> REPO/kernels


def benchmark_device(script: str, smoke: bool) -> torch.device:
    """The GPU; without one, for ``--smoke`` only, the CPU with the Triton interpreter (set
    here, before ``scalejepa.kernels`` defines its kernels)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not smoke:
        sys.exit(f"benchmarks/{script} needs a CUDA GPU; --smoke checks the script on CPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it); (None, None) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    now = dt.datetime.now(dt.timezone.utc)
    env = {
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": now.date().isoformat(),
        "timestamp_utc": now.isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_count_visible"] = torch.cuda.device_count()
    return env


def stamp(env: dict) -> str:
    return env["timestamp_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")


def output_path(out_dir: Path, name: str, env: dict, smoke: bool, suffix: str = ".json") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{name}_{'smoke_' if smoke else ''}{stamp(env)}{suffix}"


def write_json(path: Path, results: dict) -> Path:
    from scalejepa.io import atomic_write_text

    return atomic_write_text(path, json.dumps(results, indent=1, default=_jsonable))


def write_report(json_path: Path, results: dict, *, markdown: Callable[[dict], str] | None = None,
                 plot: Callable[[dict, Path], str | None] | None = None) -> Path:
    """A benchmark's results files next to each other: the chart (``plot(results, png)``
    returns None, or why it drew nothing), the Markdown table, then the JSON, which names
    both (``chart``, ``chart_skipped``, ``table``)."""
    from scalejepa.io import atomic_write_text

    if plot is not None:
        png_path = json_path.with_suffix(".png")
        skipped = plot(results, png_path)
        results["chart"] = None if skipped else png_path.name
        if skipped:
            results["chart_skipped"] = skipped
        else:
            results.pop("chart_skipped", None)
    if markdown is not None:
        md_path = json_path.with_suffix(".md")
        results["table"] = md_path.name
        atomic_write_text(md_path, markdown(results))
    return write_json(json_path, results)


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or (None, reason) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"matplotlib not importable: {exc}"
    return plt, None


def provenance_line(results: dict) -> str:
    """Where and when a results file was measured, for the top of its Markdown table."""
    env = results["env"]
    dirty = " (dirty)" if env.get("git_dirty") else ""
    return (f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"{env['timestamp_utc']}, commit {str(env['git_commit'])[:12]}{dirty}; "
            f"load average {env.get('loadavg_1_5_15min')} on {env['cpu_count']} cores at the start"
            + (" — SMOKE RUN, not a measurement" if results["smoke"] else ""))


def save_figure(fig, path: Path, title: str, *, smoke: bool, dpi: int = 120) -> None:
    """Title (marked when a smoke run made it), layout, PNG, and the figure closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title + (" (smoke)" if smoke else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def progress(message: str) -> None:
    """A progress line on stdout with the elapsed time, flushed (long GPU runs)."""
    elapsed = time.perf_counter() - _START
    print(f"[{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {message}", flush=True)


def latest_result(out_dir: Path, name: str) -> Path | None:
    """Newest non-smoke ``<name>_*.json`` in ``out_dir``."""
    files = sorted(p for p in Path(out_dir).glob(f"{name}_*.json") if "_smoke_" not in p.name)
    return files[-1] if files else None
