"""Projects the step time, scaling efficiency, wall time and GPU-hours of a run on N GPUs from
a measured single-GPU step and a communication model of FSDP / HSDP / ZeRO / DDP traffic.

Input: the single-GPU step of ``benchmarks/train_step.py`` (the newest ``train_step_*.json``
in ``--out-dir``, its best variant unless ``--variant``), or ``--step-ms`` + ``--batch`` given
by hand. Output: for each strategy and GPU count, the projected step and the paper's run
(the preset's epochs x images per epoch; ViT-H/14: 300 x 1,281,167) in wall hours and
GPU-hours next to the paper's 1152 A100-hours; ``scaling_<UTC stamp>.json`` and ``.md``.

Model (per GPU, per step; P_t trainable = context encoder + predictor, P_e target encoder,
``--param-bytes`` for gathered weights (bf16: 2), ``--grad-bytes`` for reduced gradients
(fp32: 4); a ring collective over n ranks moves (n - 1) / n of the buffer per GPU):

* ``fsdp`` (ZeRO-3, FSDP2 with reshard after forward, sharded over all N): all-gather P_t
  (forward) + P_e (the target encoder is sharded too) + P_t (backward), reduce-scatter P_t
  gradients. Over NVLink within a node; once the group spans nodes, at the per-GPU network
  bandwidth.
* ``hsdp``: the same within each node of ``--gpus-per-node``, plus an all-reduce of each
  rank's gradient shard (P_t / G) across the N / G nodes: 2 (R - 1) / R x P_t x grad / G.
* ``zero2`` (DeepSpeed ZeRO-2; weights and target replicated): reduce-scatter of P_t
  gradients + all-gather of the updated P_t weights, flat over all N.
* ``ddp``: all-reduce of P_t gradients, 2 (N - 1) / N x P_t x grad.

Time = bytes / bandwidth + collectives x ``--latency-us``; the step = compute +
max(0, communication - ``--overlap`` x compute) (the share of compute that communication can
hide behind; prefetching FSDP overlaps most of it). The global batch stays ``--global-batch``
(2048, the paper's) so the per-GPU batch shrinks with N; compute per image then follows the
FLOPs at that batch size (truncation keeps more tokens in smaller batches) at the *measured*
TFLOP/s, which is optimistic for small per-GPU batches. Use
``--per-gpu-batch`` to keep the measured batch instead (weak scaling).

Commands::

    python benchmarks/scaling.py                                        # newest train_step result
    python benchmarks/scaling.py --from-json benchmarks/results/train_step_X.json --variant truncate_sdpa
    python benchmarks/scaling.py --step-ms 210 --batch 128 --preset vit_h14_in1k_ep300 --device "NVIDIA H100 80GB HBM3"
    python benchmarks/scaling.py --gpus 16,64,128 --ib-gbs 25 --overlap 0.5
    python benchmarks/scaling.py --smoke --out-dir /tmp/bench          # placeholder input: checks the script
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    RESULTS_DIR, ensure_importable, environment, latest_result, output_path, progress, write_report,
)

ensure_importable()

from scalejepa import flops  # noqa: E402
from scalejepa.config import load_config  # noqa: E402
from scalejepa.models.vit import VIT_SIZES  # noqa: E402

STRATEGIES = ("fsdp", "hsdp", "zero2", "ddp")


@dataclass
class Links:
    nvlink_gbs: float
    ib_gbs: float
    gpus_per_node: int
    latency_us: float


def ring(nbytes: float, n: int) -> float:
    """Bytes one GPU sends in a ring all-gather / reduce-scatter of ``nbytes`` over n ranks."""
    return nbytes * (n - 1) / n if n > 1 else 0.0


def comm_ms(strategy: str, n: int, p_train: int, p_target: int, blocks: dict, links: Links,
            param_bytes: int, grad_bytes: int) -> dict:
    """Per-step communication time (ms) of one GPU, split by link."""
    g = links.gpus_per_node
    intra_bw, inter_bw = links.nvlink_gbs * 1e9, links.ib_gbs * 1e9
    if n == 1:
        return {"bytes_intra": 0.0, "bytes_inter": 0.0, "collectives": 0, "ms": 0.0}
    fsdp_bytes = lambda k: (ring(p_train * param_bytes, k) * 2 + ring(p_target * param_bytes, k)  # noqa: E731
                            + ring(p_train * grad_bytes, k))
    # One collective per FSDP unit (block) and pass: forward and backward all-gathers and the
    # reduce-scatter of the trained blocks, the target's forward all-gathers (+ a few roots).
    fsdp_collectives = 3 * blocks["trained"] + blocks["target"] + 6
    if strategy == "fsdp":
        nbytes = fsdp_bytes(n)
        intra, inter = (nbytes, 0.0) if n <= g else (0.0, nbytes)
        collectives = fsdp_collectives
    elif strategy == "hsdp":
        shard = min(n, g)
        replicas = n // shard
        intra = fsdp_bytes(shard)
        inter = 2 * (replicas - 1) / replicas * p_train * grad_bytes / shard if replicas > 1 else 0.0
        collectives = fsdp_collectives + (blocks["trained"] if replicas > 1 else 0)
    elif strategy == "zero2":
        nbytes = ring(p_train * grad_bytes, n) + ring(p_train * param_bytes, n)
        intra, inter = (nbytes, 0.0) if n <= g else (0.0, nbytes)
        collectives = 2 * blocks["trained"]
    elif strategy == "ddp":
        nbytes = 2 * ring(p_train * grad_bytes, n)
        intra, inter = (nbytes, 0.0) if n <= g else (0.0, nbytes)
        collectives = max(1, math.ceil(p_train * grad_bytes / 25e6))  # 25 MB buckets
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    ms = 1e3 * (intra / intra_bw + inter / inter_bw) + collectives * links.latency_us / 1e3
    return {"bytes_intra": intra, "bytes_inter": inter, "collectives": collectives, "ms": ms}


def measured_input(args) -> dict:
    """The single-GPU measurement: from a train_step JSON or the command line."""
    if args.step_ms:
        if not args.batch:
            sys.exit("--step-ms needs --batch (the per-GPU batch it was measured at)")
        return {"source": "command line", "step_ms": args.step_ms, "batch": args.batch, "preset": args.preset,
                "context": args.context, "device": args.device or "unspecified", "overrides": []}
    path = args.from_json or latest_result(args.out_dir, "train_step")
    if path is None:
        if args.smoke:
            return {"source": "placeholder (smoke: no measurement)", "step_ms": 250.0, "batch": 128,
                    "preset": "vit_h14_in1k_ep300", "context": "truncate", "device": "placeholder", "overrides": []}
        sys.exit(f"no train_step_*.json in {args.out_dir}: run benchmarks/train_step.py on a GPU first, "
                 "or pass --from-json, or --step-ms and --batch")
    data = json.loads(Path(path).read_text())
    name = args.variant or data.get("headline", {}).get("best_variant")
    variant = next((v for v in data["variants"] if v["variant"] == name and "step_ms_median" in v), None)
    if variant is None:
        sys.exit(f"{path}: no measured variant {name!r}")
    return {"source": f"{Path(path).name}: {name}", "step_ms": variant["step_ms_median"], "batch": variant["batch"],
            "preset": data["settings"]["preset"], "context": variant.get("context", "truncate"),
            "device": data["env"]["device"], "overrides": data["settings"].get("overrides", []),
            "smoke_input": data.get("smoke", False)}


def project(args) -> dict:
    m = measured_input(args)
    config = load_config(m["preset"], [*m["overrides"], f"mask.context={m['context']}"])
    flops_b0 = flops.expected_flops_per_image(config, m["batch"])
    achieved = flops_b0 * m["batch"] / (m["step_ms"] / 1e3)  # model FLOP/s of the measured GPU
    params = flops.param_counts(config)
    size = VIT_SIZES[config.model.arch]
    blocks = {"trained": size.depth + config.model.pred_depth, "target": size.depth}
    links = Links(args.nvlink_gbs, args.ib_gbs, args.gpus_per_node, args.latency_us)
    images = (config.data.num_samples or flops.PAPER_IMAGES_PER_EPOCH) * config.train.epochs
    peak = flops.peak_tflops_for_name(m["device"]) if m["device"] not in ("unspecified", "placeholder") else None
    rate_1 = m["batch"] / (m["step_ms"] / 1e3)
    rows = []
    flops_cache: dict[int, float] = {m["batch"]: flops_b0}
    for strategy in args.strategies:
        for n in args.gpus:
            if args.per_gpu_batch:
                b = m["batch"]
            else:
                if args.global_batch % n:
                    rows.append({"strategy": strategy, "gpus": n, "error": f"global batch {args.global_batch} "
                                 f"does not split over {n} GPUs"})
                    continue
                b = args.global_batch // n
            if b not in flops_cache:
                flops_cache[b] = flops.expected_flops_per_image(config, b)
            compute = 1e3 * b * flops_cache[b] / achieved
            c = comm_ms(strategy, n, params["trainable"], params["target"], blocks, links,
                        args.param_bytes, args.grad_bytes)
            exposed = max(0.0, c["ms"] - args.overlap * compute)
            step = compute + exposed
            rate = b / (step / 1e3)  # img/s per GPU
            wall_h = images / (n * rate) / 3600
            rows.append({
                "strategy": strategy, "gpus": n, "per_gpu_batch": b, "gflops_per_image": flops_cache[b] / 1e9,
                "compute_ms": compute, "comm_ms": c["ms"], "comm_exposed_ms": exposed, "step_ms": step,
                "comm_bytes_intra_gb": c["bytes_intra"] / 1e9, "comm_bytes_inter_gb": c["bytes_inter"] / 1e9,
                "collectives": c["collectives"], "img_s_per_gpu": rate, "img_s_total": n * rate,
                "efficiency_vs_compute": compute / step, "per_gpu_rate_vs_measured": rate / rate_1,
                "wall_hours": wall_h, "gpu_hours": wall_h * n,
                "paper_budget_over_ours_1to1": flops.PAPER_A100_HOURS / (wall_h * n),
                "mfu_pct": flops.mfu_pct(flops_cache[b], rate, peak),
            })
    return {"measured": {**m, "img_s_per_gpu": rate_1, "gflops_per_image": flops_b0 / 1e9,
                         "achieved_tflops": achieved / 1e12, "peak_tflops": peak},
            "run": {"preset": m["preset"], "arch": config.model.arch, "images": images, "epochs": config.train.epochs,
                    "images_per_epoch": config.data.num_samples or flops.PAPER_IMAGES_PER_EPOCH,
                    "paper_a100_hours": flops.PAPER_A100_HOURS, "paper": "ViT-H/14, 300 epochs, 16 A100s, < 72 h"},
            "params": params, "rows": rows}


def markdown(results: dict) -> str:
    m, run, a = results["measured"], results["run"], results["assumptions"]
    lines = [f"# Scaling projection: {run['preset']} ({run['arch']}), {run['epochs']:g} epochs x "
             f"{run['images_per_epoch']:,} images" + (" — SMOKE (placeholder input)" if results["smoke"] else ""),
             "",
             f"Measured: {m['source']} on {m['device']}: {m['step_ms']:.1f} ms/step at {m['batch']} per GPU = "
             f"{m['img_s_per_gpu']:.1f} img/s, {m['achieved_tflops']:.1f} TFLOP/s (model FLOPs).",
             f"Assumptions: NVLink {a['nvlink_gbs']} GB/s, network {a['ib_gbs']} GB/s per GPU, {a['gpus_per_node']} "
             f"GPUs per node, {a['latency_us']} us per collective, overlap {a['overlap']}, gathered weights "
             f"{a['param_bytes']} B, reduced gradients {a['grad_bytes']} B per parameter; "
             + ("per-GPU batch fixed" if a["per_gpu_batch"] else f"global batch {a['global_batch']}") + ".",
             "",
             "| strategy | GPUs | batch/GPU | compute ms | comm ms | exposed ms | step ms | efficiency | img/s/GPU "
             "| wall h | GPU-h | paper 1152 A100-h / ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['gpus']} | | | | | | | | | | {r['error']} |")
            continue
        lines.append(f"| {r['strategy']} | {r['gpus']} | {r['per_gpu_batch']} | {r['compute_ms']:.1f} | "
                     f"{r['comm_ms']:.1f} | {r['comm_exposed_ms']:.1f} | {r['step_ms']:.1f} | "
                     f"{100 * r['efficiency_vs_compute']:.0f}% | {r['img_s_per_gpu']:.1f} | {r['wall_hours']:.1f} | "
                     f"{r['gpu_hours']:.0f} | {r['paper_budget_over_ours_1to1']:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-json", type=Path, default=None, help="a train_step JSON (default: the newest)")
    p.add_argument("--variant", default="", help="variant of that JSON (default: its best)")
    p.add_argument("--step-ms", type=float, default=None, help="measured single-GPU step time instead of a JSON")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch of --step-ms")
    p.add_argument("--preset", default="vit_h14_in1k_ep300", help="preset of --step-ms")
    p.add_argument("--context", default="truncate", choices=("truncate", "pack"), help="mask.context of --step-ms")
    p.add_argument("--device", default="", help="GPU name of --step-ms (for MFU)")
    p.add_argument("--gpus", default="8,16,64,128", help="comma list of GPU counts")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list of {', '.join(STRATEGIES)}")
    p.add_argument("--global-batch", type=int, default=2048)
    p.add_argument("--per-gpu-batch", action="store_true", help="keep the measured per-GPU batch (weak scaling)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=360.0,
                   help="per-GPU collective bandwidth within a node, GB/s (H100 NVLink4: 450 peak, ~360 NCCL bus)")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="per-GPU network bandwidth, GB/s (400 Gb/s NIC = 50)")
    p.add_argument("--latency-us", type=float, default=20.0, help="fixed cost per collective")
    p.add_argument("--overlap", type=float, default=0.8, help="share of compute that can hide communication")
    p.add_argument("--param-bytes", type=int, default=2, help="bytes per gathered weight (bf16 param_dtype: 2)")
    p.add_argument("--grad-bytes", type=int, default=4, help="bytes per reduced gradient (fp32 reduce_dtype: 4)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="allow a placeholder input; writes *_smoke_* files")
    args = p.parse_args(argv)
    args.gpus = [int(n) for n in args.gpus.split(",") if n.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        p.error(f"unknown strategies {bad}; choose from {STRATEGIES}")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    env = environment(device)
    results = project(args)
    results.update(benchmark="scaling", env=env, smoke=args.smoke or results["measured"].get("smoke_input", False),
                   assumptions={k: getattr(args, k) for k in ("nvlink_gbs", "ib_gbs", "gpus_per_node", "latency_us",
                                                               "overlap", "param_bytes", "grad_bytes", "global_batch",
                                                               "per_gpu_batch")},
                   model="see the module docstring of benchmarks/scaling.py")
    results["assumptions"]["compute"] = ("compute per image follows the model FLOPs at the per-GPU batch at the "
                                         "measured TFLOP/s (optimistic for small per-GPU batches)")
    json_path = write_report(output_path(args.out_dir, "scaling", env, results["smoke"]), results, markdown=markdown)
    progress(f"wrote {json_path}")
    print(markdown(results))
    return json_path


if __name__ == "__main__":
    main()
