"""What a preset's whole run would cost across clusters and sharding layouts: one
``scalejepa-plan`` prediction per (cluster, backend), side by side with the paper's budget
(ViT-H/14, 300 epochs of ImageNet-1k on 16 A100s in under 72 hours = 1152 A100-hours).

The planner owns the model of memory, compute and communication (``scalejepa.plan``: the
training step traced on this CPU, priced on each GPU's achievable rates). Every row is a
prediction; with ``--calibrate`` the planner's phase efficiencies are first fitted to a
measured ``benchmarks/train_step.py`` results file. Writes ``scaling_<UTC stamp>.json`` and
``.md``.

    python benchmarks/scaling.py --preset vit_h14_in1k_ep300 --clusters a100-80gb:2x8,h100-sxm:2x8
    python benchmarks/scaling.py --clusters h100-sxm:1x8,h100-sxm:2x8,h100-sxm:8x8 --layouts fsdp2,hsdp
    python benchmarks/scaling.py --calibrate benchmarks/results/train_step_X.json
    python benchmarks/scaling.py --smoke --out-dir /tmp/bench     # debug_cpu: checks the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import RESULTS_DIR, ensure_importable, environment, output_path, progress, provenance_line, write_report  # noqa: E402

ensure_importable()

from scalejepa.config import load_config  # noqa: E402
from scalejepa.plan.calibrate import calibrate, calibration_text  # noqa: E402
from scalejepa.plan.hardware import parse_cluster  # noqa: E402
from scalejepa.plan.planner import price, report  # noqa: E402

LAYOUTS = {"fsdp2": ["distributed.backend=fsdp2", "distributed.shard_group_size=0"],
           "hsdp": ["distributed.backend=fsdp2"],  # shard_group_size: the GPUs per node, set per cluster
           "zero2": ["distributed.backend=deepspeed", "distributed.zero_stage=2"]}
ROW_KEYS = ("gpu", "world_size", "micro_batch_per_gpu", "grad_accum", "fits", "step_time_s", "comm_exposed_s",
            "img_s_per_gpu", "mfu", "gpu_hours_per_epoch", "gpu_hours_total", "wall_hours")


def rows(args, efficiency) -> list[dict]:
    out = []
    for spec in args.clusters:
        cluster = parse_cluster(spec)
        for layout in args.layouts:
            if layout == "hsdp" and cluster.nodes == 1:
                continue  # one node: HSDP is FSDP
            overrides = [*args.override, *LAYOUTS[layout]]
            if layout == "hsdp":
                overrides.append(f"distributed.shard_group_size={cluster.per_node}")
            progress(f"{args.preset} on {spec}, {layout} ...")
            r = report(price(load_config(args.preset, overrides), cluster, efficiency=efficiency), cluster)
            out.append({"cluster": spec, "layout": layout, **{k: r[k] for k in ROW_KEYS},
                        "peak_gib": r["memory_gib"]["peak"], "epochs": r["epochs"]})
    return out


def markdown(results: dict) -> str:
    lines = [f"# Predicted cost of {results['preset']} (`scalejepa-plan`; no GPU measured these)", "",
             f"Traced on {provenance_line(results)}.",
             "Paper's budget: ViT-H/14, 300 epochs of ImageNet-1k, <= 1152 A100-hours (16 A100s, < 72 h).", "",
             "| cluster | layout | micro x accum | peak GiB | fits | step ms | exposed comm ms | img/s/GPU | MFU "
             "| GPU-h/epoch | GPU-h total | wall h |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['cluster']} | {r['layout']} | {r['micro_batch_per_gpu']} x {r['grad_accum']} | "
                     f"{r['peak_gib']:.1f} | {'yes' if r['fits'] else 'no'} | {1e3 * r['step_time_s']:.0f} | "
                     f"{1e3 * r['comm_exposed_s']:.0f} | {r['img_s_per_gpu']:.0f} | {100 * r['mfu']:.0f}% | "
                     f"{r['gpu_hours_per_epoch']:.2f} | {r['gpu_hours_total']:.0f} | {r['wall_hours']:.1f} |")
    if results.get("calibration"):
        lines += ["", "```", calibration_text(results["calibration"]), "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_h14_in1k_ep300")
    p.add_argument("--clusters", default="a100-80gb:2x8,h100-sxm:2x8", help="comma list of KIND:NODESxPER_NODE")
    p.add_argument("--layouts", default="fsdp2,hsdp", help=f"comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--override", action="append", default=[], help="a training override, repeatable")
    p.add_argument("--calibrate", type=Path, default=None, help="a train_step results file to calibrate on")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="debug_cpu on small clusters: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.clusters = "debug_cpu", "a100-40gb:1x2,h100-sxm:2x2"
        args.override = [*args.override, "train.batch_size=8"]
    args.clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
    args.layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    bad = [s for s in args.layouts if s not in LAYOUTS]
    if bad:
        p.error(f"unknown layouts {bad}; choose from {', '.join(LAYOUTS)}")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    env = environment(torch.device("cpu"))  # the trace runs here; the plan is about the clusters named
    calibration = calibrate(args.calibrate) if args.calibrate else None
    results = {"benchmark": "scaling", "predicted": True, "env": env, "smoke": args.smoke, "preset": args.preset,
               "overrides": args.override, "calibration": calibration,
               "rows": rows(args, calibration["efficiency"] if calibration else None)}
    path = write_report(output_path(args.out_dir, "scaling", env, args.smoke), results, markdown=markdown)
    progress(f"wrote {path}")
    print(markdown(results))
    return path


if __name__ == "__main__":
    main()
