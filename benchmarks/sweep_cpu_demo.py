"""The shipped ``cpu_demo`` sweep end to end, packaged under benchmarks/results/.

    OMP_NUM_THREADS=1 python benchmarks/sweep_cpu_demo.py --run --dir /tmp/sweep_cpu_demo
    python benchmarks/sweep_cpu_demo.py --dir /tmp/sweep_cpu_demo   # package a finished sweep

``--run``: plan, run (``--parallel 2``), collect and report with ``scalejepa-sweep``. Then
``benchmarks/results/sweep_cpu_demo_<date>/`` gets the report (summary.md + PNGs), the
sweep's runs.jsonl, fit.json and plan.json, and ``meta.json``: the environment (device,
date, versions, load average), and the wall time from the plan's creation to the last
run's result (both read off the sweep's files) with the per-run times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from _common import RESULTS_DIR, environment, ensure_importable, write_json


def sweep(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "scalejepa.sweep.cli", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="the sweep directory")
    parser.add_argument("--run", action="store_true", help="run the sweep first (else: package a finished one)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--note", default="", help="recorded in meta.json (e.g. the machine's load)")
    args = parser.parse_args()
    ensure_importable()
    if args.run:
        sweep("plan", "cpu_demo", "--out", str(args.dir))
        sweep("run", str(args.dir), "--parallel", str(args.parallel))
        sweep("collect", str(args.dir))
        sweep("report", str(args.dir))
    plan = json.loads((args.dir / "plan.json").read_text())
    rows = [json.loads(line) for line in (args.dir / "runs.jsonl").read_text().splitlines() if line.strip()]
    started = dt.datetime.fromisoformat(plan["created"].replace("Z", "+00:00"))
    finished = max(dt.datetime.fromisoformat(r["finished"].replace("Z", "+00:00")) for r in rows)
    report = args.dir / "report" / "summary.md"
    reported = dt.datetime.fromtimestamp(report.stat().st_mtime, dt.timezone.utc)
    env = environment(torch.device("cpu"))
    out = RESULTS_DIR / f"sweep_cpu_demo_{env['date'].replace('-', '')}"
    out.mkdir(parents=True, exist_ok=True)
    for path in (args.dir / "report").glob("*"):
        shutil.copy2(path, out / path.name)
    for name in ("runs.jsonl", "fit.json", "plan.json"):
        shutil.copy2(args.dir / name, out / name)
    meta = {
        **env, "spec": "cpu_demo", "runs": len(rows), "parallel": args.parallel, "note": args.note,
        "plan_created_utc": plan["created"], "last_run_finished_utc": finished.isoformat(),
        "report_written_utc": reported.isoformat(),
        "wall_s_plan_to_last_run": (finished - started).total_seconds(),
        "wall_s_plan_to_report": (reported - started).total_seconds(),
        "per_run": [{"run": r["run"], "train_wall_s": r["train_wall_s"], "train_loop_s": r["train_loop_s"],
                     "knn_seconds": r.get("knn_seconds"), "linear_seconds": r.get("linear_seconds"),
                     "flops": r["flops"], "knn_err": r["knn_err"], "linear_err": r.get("linear_err")}
                    for r in rows],
    }
    print(write_json(out / "meta.json", meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
