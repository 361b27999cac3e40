"""``scalejepa-plan``: will a preset fit, how fast will it train, what will it cost, on GPUs
you do not have yet? Every figure is predicted from the real training step traced on this
CPU (``scalejepa.plan``); nothing here ran on a GPU.

    scalejepa-plan --config vit_h14_in1k_ep300 --gpus a100-80gb:2x8 distributed.backend=fsdp2
    scalejepa-plan --config vit_h14_in1k_ep300 --gpus h100-sxm:2x8 distributed.backend=fsdp2 \\
        distributed.shard_group_size=8 --max-batch --json plan.json
    scalejepa-plan --config vit_g16_in22k_ep44 --gpus h100-sxm:8x8 distributed.backend=fsdp2 --recommend

``--gpus KIND:NODESxPER_NODE`` (kinds: a100-40gb, a100-80gb, h100-sxm, h100-pcie, h200, b200);
overrides are training's (``section.key=value``) and are checked as training checks them.
Exit status: 0, 2 on a config error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scalejepa.config import ConfigError, load_config
from scalejepa.io import atomic_write_text
from scalejepa.plan.calibrate import calibrate, calibration_text
from scalejepa.plan.hardware import GPU_KINDS, parse_cluster
from scalejepa.plan.planner import max_micro_batch, price, recommend, report

_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:5.1f} s] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scalejepa-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="preset name or YAML path (as scalejepa-train)")
    p.add_argument("--gpus", required=True, help=f"KIND:NODESxPER_NODE, e.g. h100-sxm:2x8; kinds: {', '.join(GPU_KINDS)}")
    p.add_argument("overrides", nargs="*", help="section.key=value, as scalejepa-train")
    p.add_argument("--max-batch", action="store_true", help="also find the largest micro-batch per GPU that fits")
    p.add_argument("--recommend", action="store_true",
                   help="price FSDP2 / HSDP / ZeRO-2 and -3, with and without activation checkpointing, and pick one")
    p.add_argument("--calibrate", type=Path, default=None, metavar="TRAIN_STEP_JSON",
                   help="fit per-phase efficiencies to a measured benchmarks/train_step.py results file first, "
                        "print the planner's error on each of its variants, and plan with them")
    p.add_argument("--inter-node-gbps", type=float, default=None,
                   help="per-GPU network rate in GB/s (default: the kind's reference NIC, see scalejepa/plan/hardware.py)")
    p.add_argument("--json", type=Path, default=None, help="write the report as one JSON object")
    p.add_argument("--md", type=Path, default=None, help="write the report as Markdown")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict:
    cluster = parse_cluster(args.gpus, args.inter_node_gbps)
    config = load_config(args.config, args.overrides)
    calibration = None
    if args.calibrate:
        progress(f"calibrating on {args.calibrate} ...")
        calibration = calibrate(args.calibrate)
        print(calibration_text(calibration))
    efficiency = calibration["efficiency"] if calibration else None
    priced = price(config, cluster, efficiency=efficiency, progress=progress)
    result = report(priced, cluster)
    result.update(preset=args.config, overrides=list(args.overrides), calibration=calibration,
                  traced_on=provenance())
    if args.max_batch:
        result.update(max_micro_batch(priced.config, cluster, first=priced.peak_trace, progress=progress))
    if args.recommend:
        result["recommendation"] = recommend(priced, cluster, efficiency=efficiency, progress=progress)
    return result


def provenance() -> dict:
    """Where and when the step was traced (the plan itself is about the GPUs named)."""
    import datetime
    import os
    import platform

    import torch

    return {"device": f"cpu ({platform.machine()}, {os.cpu_count()} logical cores)", "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def text(r: dict) -> str:
    m, ph = r["memory_gib"], r["phases_s"]
    c = r["cluster"]
    ms = lambda s: f"{1e3 * s:.0f}"  # noqa: E731
    lines = [
        f"scalejepa-plan: {r['preset']} on {r['world_size']} x {r['gpu']} ({c['nodes']} node(s) x {c['per_node']}): "
        + ("PREDICTED from a traced CPU step, calibrated on " + r["calibration"]["source"] if r.get("calibration") else
         "PREDICTED from a traced CPU step (roofline at achievable rates); no GPU measured this"),
        f"  config: {r['label']}, {r['precision']}, attention {r['attn_impl']}, mask.context {r['mask_context']}, "
        f"micro-batch {r['micro_batch_per_gpu']} x accum {r['grad_accum']} x {r['world_size']} GPUs = {r['global_batch']}",
        "  memory per GPU, largest of 16 mask draws (GiB): " + "  ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "peak")
        + f"  | peak {m['peak']:.2f} of {r['usable_gib']:.1f} usable -> " + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"  step {ms(r['step_time_s'])} ms = target fwd {ms(ph['target_forward'])} + context+predictor "
        f"{ms(ph['context_predictor'])} + backward {ms(ph['backward'])} + optimizer {ms(ph['optimizer'])} + EMA "
        f"{ms(ph['ema'])} + data {ms(ph['data_wait'])} + exposed comm {ms(r['comm_exposed_s'])} "
        f"(of {ms(r['comm_total_s'])} ms of collectives)",
        f"  throughput: {r['img_s_per_gpu']:.0f} img/s per GPU, MFU {100 * r['mfu']:.1f}% "
        f"({r['model_gflops_per_image']:.0f} GFLOP/img model FLOPs)",
        f"  cost: {r['gpu_hours_per_epoch']:.2f} GPU-h per epoch; {r['epochs']:g} epochs = {r['gpu_hours_total']:.0f} "
        f"{r['gpu']}-hours, {r['wall_hours']:.1f} h wall on {r['world_size']} GPUs "
        f"(paper: <= {r['paper_budget']['a100_hours']:.0f} A100-hours, < {r['paper_budget']['hours']:.0f} h on "
        f"{r['paper_budget']['gpus']} A100s, for ViT-H/14 x 300 epochs)",
        f"  loader: {r['loader_cores_per_gpu']:.1f} CPU cores per GPU at {r['loader_rate']['img_s_per_core']:.0f} img/s "
        "per core",
    ]
    if r.get("traced_as"):
        lines.append("  traced with stand-ins: " + "; ".join(f"{k} {v}" for k, v in r["traced_as"].items()))
    if r.get("analytic_parts"):
        lines.append("  note: DeepSpeed is not traced: model states from its estimators, collectives from volumes")
    if "max_batch_per_gpu" in r:
        capped = " (the whole per-GPU share of the global batch)" if r["max_batch_capped"] else ""
        lines.append(f"  max micro-batch per GPU: {r['max_batch_per_gpu']}{capped} (traced peaks "
                     + ", ".join(f"{b}: {p:.1f}" for b, p in r["traced_peaks_gib"].items())
                     + f" GiB); global batch {r['global_batch']} = {r['world_size']} x "
                     f"{r['micro_batch_for_global_batch']} x accum {r['grad_accum_for_global_batch']}")
    for row in r.get("recommendation", []):
        lines.append(f"  {'->' if row is r['recommendation'][0] else '  '} {row['label']:<28} {row['reason']}")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    m, ph = r["memory_gib"], r["phases_s"]
    rows = [
        f"# Plan (predicted): {r['preset']} on {r['world_size']} x {r['gpu']}",
        "",
        "Predicted by `scalejepa-plan` from the training step traced on a CPU (fake tensors, fake process group) "
        "and priced on a roofline at achievable rates (`scalejepa/plan/hardware.py`). No GPU measured these figures.",
        "",
        f"Command: `scalejepa-plan --config {r['preset']} --gpus {r['gpu']}:{r['cluster']['nodes']}x"
        f"{r['cluster']['per_node']} {' '.join(r['overrides'])}`",
        "",
        "| | |", "|---|---|",
        f"| configuration | {r['label']}, {r['precision']}, {r['attn_impl']}, mask.context {r['mask_context']} |",
        f"| batch | micro {r['micro_batch_per_gpu']} x accum {r['grad_accum']} x {r['world_size']} GPUs = {r['global_batch']} |",
        f"| memory per GPU (GiB) | " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "peak")
        + f"; **peak {m['peak']:.2f}** of {r['usable_gib']:.1f} usable: {'fits' if r['fits'] else 'does not fit'} |",
        f"| step | **{1e3 * r['step_time_s']:.0f} ms**: " + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in ph.items())
        + f", exposed communication {1e3 * r['comm_exposed_s']:.0f} (of {1e3 * r['comm_total_s']:.0f}) |",
        f"| throughput | {r['img_s_per_gpu']:.0f} img/s per GPU, MFU {100 * r['mfu']:.1f}% |",
        f"| cost | {r['gpu_hours_per_epoch']:.2f} GPU-h per epoch; {r['epochs']:g} epochs: **{r['gpu_hours_total']:.0f} "
        f"{r['gpu']}-hours, {r['wall_hours']:.1f} h wall** |",
        f"| paper's budget | ViT-H/14 x 300 epochs: <= {r['paper_budget']['a100_hours']:.0f} A100-hours "
        f"(16 A100s, < 72 h) |",
        f"| data loading | {r['loader_cores_per_gpu']:.1f} CPU cores per GPU ({r['loader_rate']['source']}) |",
    ]
    if "max_batch_per_gpu" in r:
        rows.append(f"| max micro-batch per GPU | {r['max_batch_per_gpu']} (global {r['global_batch']} = "
                    f"{r['world_size']} x {r['micro_batch_for_global_batch']} x accum "
                    f"{r['grad_accum_for_global_batch']}) |")
    if r.get("recommendation"):
        rows += ["", "| candidate | fits | peak GiB | step ms | img/s/GPU | why |", "|---|---|---|---|---|---|"]
        for row in r["recommendation"]:
            rows.append(f"| {row['label']} | {'yes' if row['fits'] else 'no'} | {row['peak_gib']:.1f} | "
                        f"{1e3 * row['step_time_s']:.0f} | {row['img_s_per_gpu']:.0f} | {row['reason']} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = plan(args)
    except ConfigError as exc:
        print(f"scalejepa-plan: config error: {exc}", file=sys.stderr)
        return 2
    print(text(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    if args.md:
        atomic_write_text(args.md, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
