"""``scalejepa-eval``: kNN and linear probe of a frozen (target) encoder.

    scalejepa-eval knn --weights runs/debug --train-shards builtin:mnist5k:train \\
        --val-shards builtin:mnist5k:val
    scalejepa-eval linear --weights runs/debug/export/target_encoder.pt \\
        --train-shards /data/in1k-train --val-shards /data/in1k-val --compare-random
    torchrun --standalone --nproc-per-node=8 -m scalejepa.eval.cli knn --weights RUN ...

``--weights`` takes a run directory (its newest committed checkpoint), a checkpoint step
directory, an exported ``.pt`` (``scalejepa-export``, or RUN/export/target_encoder.pt) or
a reference I-JEPA checkpoint. ``--random-init`` evaluates the same architecture
untrained (with the run's seed: the weights its target encoder started from);
``--compare-random`` runs both and reports them side by side. A table goes to stdout,
then, as its last line, the result as one JSON object (also written to ``--out``).
Accuracies are in percent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scalejepa.config import load_config
from scalejepa.data.cache import resolve_shards
from scalejepa.data.shard_index import ShardIndexError
from scalejepa.dist_env import barrier, init_distributed, shutdown_distributed
from scalejepa.eval import knn as knn_mod
from scalejepa.eval import linear as linear_mod
from scalejepa.eval.features import EvalDataError, Features, extract_features
from scalejepa.eval.weights import EncoderSpec, WeightsError, build_encoder_from, load_weights, random_encoder

log = logging.getLogger("scalejepa.eval")


@dataclass
class Candidate:
    """One encoder to evaluate and how to describe it."""

    name: str  # "pretrained" or "random_init"
    encoder: torch.nn.Module
    spec: EncoderSpec
    info: dict


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalejepa-eval", description="kNN and linear-probe evaluation of a frozen I-JEPA encoder.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{knn,linear}")
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("weights")
    group.add_argument("--weights", help="run directory, checkpoint step directory, exported .pt, or reference "
                                         "I-JEPA checkpoint")
    group.add_argument("--entry", choices=("target", "encoder"), default="target",
                       help="target encoder (default, the paper's protocol) or context encoder")
    group.add_argument("--random-init", action="store_true",
                       help="evaluate the architecture of --weights (or --config) untrained")
    group.add_argument("--compare-random", action="store_true",
                       help="evaluate --weights and its random init, side by side")
    group.add_argument("--config", help="preset or YAML giving the architecture for --random-init without --weights")
    group.add_argument("--seed", type=int, default=None,
                       help="random-init seed (default: the run's train.seed, else 0)")
    data = common.add_argument_group("data")
    data.add_argument("--train-shards", required=True, help="labeled training shards: directory with index.json, "
                                                            "brace URL, comma list, or builtin:NAME[:SPLIT]")
    data.add_argument("--val-shards", required=True, help="labeled validation shards (same forms)")
    feats = common.add_argument_group("features")
    feats.add_argument("--last-n", type=int, default=1, help="concatenate the pooled tokens of the last N blocks")
    feats.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    feats.add_argument("--num-workers", type=int, default=2, help="decoding processes per rank")
    feats.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    feats.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="auto: bf16 autocast on GPU, fp32 on CPU")
    common.add_argument("--out", type=Path, help="write the JSON result here")

    knn = sub.add_parser("knn", parents=[common], help="weighted k-NN (cosine, T=0.07)",
                         description="Weighted k-NN on L2-normalised features (DINOv2's protocol).")
    knn.add_argument("--k", type=int, nargs="+", default=list(knn_mod.KS),
                     help="neighbour counts (default 10 20 100 200)")
    knn.add_argument("--temperature", type=float, default=knn_mod.TEMPERATURE)

    linear = sub.add_parser("linear", parents=[common], help="linear probe on cached features",
                            description="Linear heads for several learning rates trained together on cached "
                                        "features; the lr is picked on a held-out part of the training split.")
    linear.add_argument("--lrs", type=float, nargs="+", default=list(linear_mod.LRS))
    linear.add_argument("--epochs", type=int, default=linear_mod.EPOCHS)
    linear.add_argument("--probe-batch-size", type=int, default=linear_mod.BATCH_SIZE)
    linear.add_argument("--weight-decay", type=float, default=0.0)
    linear.add_argument("--holdout-fraction", type=float, default=linear_mod.HOLDOUT_FRACTION)
    linear.add_argument("--probe-seed", type=int, default=0, help="held-out split and batch order")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    problem = _check_args(args)
    if problem:
        parser.error(problem)
    try:
        env = init_distributed(args.device)
    except RuntimeError as exc:  # e.g. --device cuda without a GPU
        print(f"scalejepa-eval: error: {exc}", file=sys.stderr)
        return 1
    try:
        result = evaluate(args, env)
        barrier()
    except (WeightsError, EvalDataError, ShardIndexError, FileNotFoundError, ValueError) as exc:
        print(f"scalejepa-eval: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if env.is_main:
        print(format_table(result))
        line = json.dumps(result)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(line)
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    if args.random_init and args.compare_random:
        return "--random-init and --compare-random exclude each other"
    if args.compare_random and not args.weights:
        return "--compare-random needs --weights"
    if not args.weights and not (args.random_init and args.config):
        return "give --weights (a run directory, checkpoint or .pt), or --random-init with --config PRESET"
    if args.last_n < 1:
        return "--last-n must be >= 1"
    if args.command == "knn" and any(k < 1 for k in args.k):
        return "every --k must be >= 1"
    if args.command == "linear" and args.epochs < 1:
        return "--epochs must be >= 1"
    return None


def candidates(args: argparse.Namespace, device: torch.device) -> list[Candidate]:
    """The encoder(s) to evaluate: pretrained, random init, or both."""
    if args.weights:
        weights = load_weights(args.weights, args.entry)
        spec, seed = weights.spec, weights.seed if args.seed is None else args.seed
        base = {"weights": weights.source, "step": weights.step}
    else:
        config = load_config(args.config)
        spec = EncoderSpec.from_config(config)
        seed = config.train.seed if args.seed is None else args.seed
        base = {"weights": None, "step": None}
    out = []
    if not args.random_init:
        out.append(Candidate("pretrained", build_encoder_from(weights, device), spec,
                             {**base, "random_init": False}))
    if args.random_init or args.compare_random:
        info = {"weights": None, "step": None, "architecture_from": base["weights"], "random_init": True, "seed": seed}
        out.append(Candidate("random_init", random_encoder(spec, seed, device), spec, info))
    return out


def evaluate(args: argparse.Namespace, env) -> dict:
    train_urls, train_index = resolve_shards(args.train_shards)
    val_urls, val_index = resolve_shards(args.val_shards)
    precision = args.precision if args.precision != "auto" else ("bf16" if env.device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if precision == "bf16" else None
    results = {}
    for cand in candidates(args, env.device):
        start = time.monotonic()
        common = dict(image_size=cand.spec.image_size, mean=cand.spec.mean, std=cand.spec.std, last_n=args.last_n,
                      batch_size=args.batch_size, num_workers=args.num_workers, device=env.device,
                      autocast_dtype=autocast)
        train = extract_features(cand.encoder, train_urls, total=(train_index or {}).get("samples"),
                                 what=f"{cand.name} train features", **common)
        val = extract_features(cand.encoder, val_urls, total=(val_index or {}).get("samples"),
                               what=f"{cand.name} val features", **common)
        train.require_labels("training")
        val.require_labels("validation")
        result = classify(args, train, val, env.device) if env.is_main else {}
        result.update(cand.info)
        result.update({
            "protocol": args.command, "arch": cand.spec.arch, "image_size": cand.spec.image_size,
            "entry": args.entry, "last_n": args.last_n, "feature_dim": int(train.features.shape[1]),
            "train_samples": len(train), "val_samples": len(val), "world_size": env.world_size,
            "precision": precision, "seconds": round(time.monotonic() - start, 2),
        })
        results[cand.name] = result
    if len(results) == 1:
        return next(iter(results.values()))
    pretrained, baseline = results["pretrained"], results["random_init"]
    gain = pretrained.get("top1", 0.0) - baseline.get("top1", 0.0)  # results live on rank 0 only
    return {**pretrained, "random_init_baseline": baseline, "gain_top1": round(gain, 4)}


def classify(args: argparse.Namespace, train: Features, val: Features, device: torch.device) -> dict:
    if args.command == "knn":
        per_k = knn_mod.knn_classify(train.features.to(device), train.labels, val.features.to(device), val.labels,
                                     ks=args.k, temperature=args.temperature)
        return {**knn_mod.knn_report(per_k), "temperature": args.temperature}
    return linear_mod.linear_probe(train.features, train.labels, val.features, val.labels, lrs=args.lrs,
                                   epochs=args.epochs, batch_size=args.probe_batch_size,
                                   weight_decay=args.weight_decay, holdout_fraction=args.holdout_fraction,
                                   seed=args.probe_seed, device=device)


# ----------------------------------------------------------------------------- report


def format_table(result: dict) -> str:
    baseline = result.get("random_init_baseline")
    what = "random init" if result.get("random_init") else f"{result['entry']} encoder"
    source = result.get("weights") or result.get("architecture_from")
    origin = f" of {source}" if source else ""
    step = f", step {result['step']}" if result.get("step") is not None else ""
    head = (f"{result['protocol']} | {result['arch']} {what}{origin}{step} | {result['train_samples']} train / "
            f"{result['val_samples']} val | {result['feature_dim']}-d features (last {result['last_n']})")
    lines = [head]
    if result["protocol"] == "knn":
        extra = f" {'random top-1':>13} {'top-5':>8}" if baseline else ""
        lines.append(f"{'k':>6} {'top-1':>8} {'top-5':>8}{extra}")
        for k, row in result["per_k"].items():
            line = f"{k:>6} {row['top1']:8.2f} {row['top5']:8.2f}"
            if baseline:
                other = baseline["per_k"][k]
                line += f" {other['top1']:13.2f} {other['top5']:8.2f}"
            lines.append(line)
    else:
        lines.append(f"{'lr':>8} {'held-out':>9} {'val top-1':>10}"
                     + (f" {'random held-out':>16} {'val top-1':>10}" if baseline else ""))
        for i, row in enumerate(result["per_lr"]):
            mark = "*" if row["lr"] == result["best_lr"] else " "
            line = f"{row['lr']:>8g} {row['holdout_top1']:9.2f} {row['val_top1']:9.2f}{mark}"
            if baseline:
                other = baseline["per_lr"][i]
                mark = "*" if other["lr"] == baseline["best_lr"] else " "
                line += f" {other['holdout_top1']:16.2f} {other['val_top1']:9.2f}{mark}"
            lines.append(line)
        lines.append("(* = lr picked on the held-out part of the training split)")
    summary = f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}"
    if baseline:
        summary += f"  | random init top-1 {baseline['top1']:.2f}  top-5 {baseline['top5']:.2f}  " \
                   f"| gain {result['gain_top1']:+.2f}"
    lines.append(summary)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
