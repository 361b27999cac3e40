"""I-JEPA pretraining.

One process (CPU or one GPU):

    scalejepa-train --config debug_cpu --run-dir runs/debug
    scalejepa-train --config vit_b16_in1k --run-dir runs/vitb data.shards=/data/in1k-shards

Several GPUs or nodes (see launch/ for multi-node and SLURM):

    torchrun --standalone --nproc-per-node=8 -m scalejepa.train \\
        --config vit_h14_in1k_ep300 --run-dir runs/vith14 data.shards=/data/in1k-shards \\
        distributed.backend=fsdp2

``--resume auto`` (the default) continues from the newest committed checkpoint in the
run directory, ``never`` refuses a run directory that has checkpoints, a path resumes
from that checkpoint. Overrides are ``section.key=value``; ``--help`` lists the presets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scalejepa import flops
from scalejepa.checkpoint import Checkpointer, CheckpointError, step_of
from scalejepa.config import Config, ConfigError, load_config, preset_names, save_config, validate
from scalejepa.data.pipeline import LoaderState, SyntheticLoader, TrainLoader
from scalejepa.dist_env import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from scalejepa.eval.monitors import collapse_metrics
from scalejepa.masks import MaskGenerator
from scalejepa.metrics import MetricsWriter
from scalejepa.parallelize import autocast_dtype, build_engine
from scalejepa.schedules import Schedules

log = logging.getLogger("scalejepa.train")


class NonFiniteLossError(RuntimeError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scalejepa-train",
        description="I-JEPA pretraining.",
        epilog=f"presets: {', '.join(preset_names())}",
    )
    parser.add_argument("--config", required=True, help="preset name or path to a YAML file")
    parser.add_argument("--run-dir", required=True, type=Path, help="where config, metrics, logs and checkpoints go")
    parser.add_argument("--resume", default="auto", help="auto (default) | never | PATH to a checkpoint step directory")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        validate(config)
    except ConfigError as exc:
        print(f"scalejepa-train: config error: {exc}", file=sys.stderr)
        return 2
    env = init_distributed(config.train.device)
    try:
        train(config, args.run_dir, args.resume, env)
        barrier()
    except ConfigError as exc:  # found once the world size, grid or data are known
        print(f"scalejepa-train: config error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, FileNotFoundError) as exc:
        print(f"scalejepa-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return 0


def train(config: Config, run_dir: Path, resume: str, env: DistEnv) -> dict:
    # ---------------------------------------------------------------- setup
    run_dir = Path(run_dir)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    t, grid = config.train, config.model.image_size // config.model.patch_size
    # Checks that need the world size or the patch grid, before anything is written.
    per_rank_batch = divide_batch(t.batch_size, env.world_size, t.grad_accum)
    mask_generator = MaskGenerator(grid, config.mask)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    resume_from = find_resume_checkpoint(checkpointer, resume)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    # ---------------------------------------------------------------- data size and schedules
    urls, num_samples = resolve_data(config, env)
    steps_per_epoch = max(1, num_samples // t.batch_size)
    total_steps = t.steps or max(1, round(t.epochs * steps_per_epoch))
    warmup_steps = round(total_steps * min(config.optim.warmup_epochs / t.epochs, 1.0)) if t.epochs > 0 else 0
    schedules = Schedules(total_steps, warmup_steps, config.optim)
    stop_step = min(t.stop_at_step or total_steps, total_steps)

    # ---------------------------------------------------------------- model, parallelism, optimizer
    engine = build_engine(config, env)

    # ---------------------------------------------------------------- resume
    start_step, loader_state = 0, None
    if resume_from is not None:
        start_step, loader_state = restore(checkpointer, resume_from, engine, env)
        if env.is_main:
            log.info("resumed from %s at step %d", resume_from, start_step)

    # ---------------------------------------------------------------- data
    loader = build_loader(config, urls, per_rank_batch, mask_generator, env, start_step, loader_state)

    # ---------------------------------------------------------------- loop
    metrics = MetricsWriter(run_dir, enabled=env.is_main, resume_step=start_step if resume_from else None)
    if env.is_main:
        log.info(
            "training %s for %d steps (%d per epoch, %d warm-up) from step %d, global batch %d = %d ranks x %d x %d accum",
            config.model.arch, total_steps, steps_per_epoch, warmup_steps, start_step, t.batch_size,
            env.world_size, per_rank_batch // t.grad_accum, t.grad_accum,
        )
    peak_tflops = flops.peak_tflops(env.device)
    knn = build_knn_evaluator(config)
    window = Window(start_step)
    first_loss = last_loss = None
    for step in range(start_step, stop_step):
        lr, wd, momentum = schedules.lr(step), schedules.weight_decay(step), schedules.ema_momentum(step)
        done = step + 1
        knn_step = knn is not None and done % config.eval.knn_every == 0
        log_step = done % t.log_every == 0 or done == stop_step or knn_step
        step_loss = torch.zeros((), device=env.device)
        for micro in range(t.grad_accum):
            tick = time.perf_counter()
            batch = next(loader)
            window.data_wait += time.perf_counter() - tick
            keep_targets = log_step and env.is_main and micro == t.grad_accum - 1  # for the collapse monitors
            loss = engine.forward_backward(batch.images, batch.masks, 1.0 / t.grad_accum, keep_targets=keep_targets)
            step_loss += loss / t.grad_accum
            window.add_batch(batch)
        step_loss = all_reduce_mean(step_loss)  # the global batch's loss, the same on every rank
        # The one host sync of every step: never let a non-finite loss reach the weights.
        if not torch.isfinite(step_loss):
            raise NonFiniteLossError(
                f"loss is {step_loss.item()} at step {step} (lr {lr:.3g}): stopped before the optimizer step, the "
                f"weights are untouched. Lower optim.lr, set optim.clip_grad (e.g. 1.0) or check the data; the run "
                f"can continue from its last checkpoint with --resume auto"
            )
        checkpointer.wait()  # an async save must finish reading the weights before they change
        grad_norm = engine.step(lr, wd)
        engine.update_target(momentum)
        window.loss_sum += step_loss

        if log_step:
            record = window.summary(done, lr, wd, momentum, env.world_size, loader.corrupt_total)
            record.update(window.perf(config, env.world_size, peak_tflops, num_samples))
            if grad_norm is not None:
                record["train/grad_norm"] = float(grad_norm)
            if env.is_main:
                record.update(collapse_record(engine.last_targets))
            if knn_step:  # every rank: a sharded encoder's forward is collective
                result = knn(engine.eval_encoder, env.device, autocast_dtype(config, env.device))
                record.update({"eval/knn_top1": result["knn_top1"], "eval/knn_top5": result["knn_top5"]})
            first_loss = record["train/loss"] if first_loss is None else first_loss
            last_loss = record["train/loss"]
            if env.is_main:
                metrics.log(done, record, {"epoch": done / steps_per_epoch})
                log.info(progress_line(done, total_steps, record, window.eta(done, stop_step)))
            window = Window(done)
        if done == stop_step or (config.checkpoint.interval and done % config.checkpoint.interval == 0):
            save(checkpointer, done, engine, loader, config, env)

    checkpointer.wait()
    metrics.close()
    export_path = export_target(engine, run_dir, env) if stop_step == total_steps else None
    summary = {"steps": stop_step, "first_loss": first_loss, "last_loss": last_loss, "run_dir": str(run_dir),
               "tensorboard": str(run_dir / "tb"), "export": str(export_path) if export_path else None}
    if env.is_main:
        print_summary(summary)
    return summary


# ---------------------------------------------------------------------------- helpers


def divide_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """Per-rank batch; the global batch must split evenly over ranks and micro-batches."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by world size x train.grad_accum = "
            f"{world_size} x {grad_accum}: pick a batch size that is a multiple of {world_size * grad_accum}"
        )
    return global_batch // world_size


def resolve_data(config: Config, env: DistEnv) -> tuple[list[str], int]:
    """(shard URLs, images per epoch)."""
    from scalejepa.data import cache

    data = config.data
    if data.synthetic:
        return [], data.num_samples or 1_281_167
    if data.shards:
        urls, index = cache.resolve_shards(data.shards)
    else:
        if env.is_main:  # build once; the others wait, then find the cache
            cache.builtin_shards(data.builtin, split="train")
        if env.distributed:
            torch.distributed.barrier()
        urls, index = cache.resolve_shards(str(cache.builtin_shards(data.builtin, split="train")))
    num_samples = data.num_samples or (index or {}).get("samples", 0)
    if not num_samples and not config.train.steps:
        raise ConfigError(
            f"no index.json next to data.shards={data.shards!r} says how many images an epoch has: "
            "set data.num_samples (e.g. 1281167 for ImageNet-1k) or train.steps"
        )
    return urls, max(num_samples, 1)


def build_loader(config, urls, per_rank_batch, mask_generator, env, start_step, state):
    t, data = config.train, config.data
    micro_batch = per_rank_batch // t.grad_accum
    start = start_step * t.grad_accum  # the loader counts micro-batches
    if data.synthetic:
        return SyntheticLoader(batch_size=micro_batch, image_size=config.model.image_size,
                               mask_generator=mask_generator, seed=t.seed, rank=env.rank,
                               world_size=env.world_size, start_step=start, device=env.device)
    return TrainLoader(
        urls, batch_size=micro_batch, image_size=config.model.image_size, crop_scale=data.crop_scale,
        mean=data.mean, std=data.std, mask_generator=mask_generator, seed=t.seed, rank=env.rank,
        world_size=env.world_size, num_workers=data.num_workers, start_step=start, state=state,
        shuffle_buffer=data.shuffle_buffer, jpeg_draft=data.jpeg_draft, device=env.device,
    )


def find_resume_checkpoint(checkpointer: Checkpointer, resume: str) -> Path | None:
    if resume == "auto":
        return checkpointer.latest()
    if resume == "never":
        if checkpointer.latest() is not None:
            raise CheckpointError(
                f"{checkpointer.folder} already holds checkpoints and --resume never was given: "
                "use --resume auto to continue, or a new --run-dir to start over"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    step_of(path)
    return path


class Window:
    """Accumulates what happens between two log steps; host syncs only in summary()."""

    def __init__(self, step: int):
        self.start_step = step
        self.start_time = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.context_tokens = 0
        self.target_tokens = 0
        self.loss_sum: torch.Tensor | float = 0.0

    def add_batch(self, batch) -> None:
        self.images += batch.masks.batch_size
        self.context_tokens += batch.masks.context_tokens
        self.target_tokens += batch.masks.target_tokens

    def summary(self, step, lr, wd, momentum, world_size, corrupt) -> dict[str, float]:
        steps = step - self.start_step
        loss = float(self.loss_sum) / steps  # the log step's sync
        elapsed = time.perf_counter() - self.start_time
        self.elapsed = elapsed
        return {
            "train/loss": loss,
            "train/lr": lr,
            "train/wd": wd,
            "train/ema_momentum": momentum,
            "train/context_tokens": self.context_tokens / max(1, self.images),
            "train/target_tokens": self.target_tokens / max(1, self.images),
            "perf/imgs_per_sec": self.images * world_size / elapsed,
            "perf/step_time_s": elapsed / steps,
            "perf/data_wait_pct": 100.0 * self.data_wait / elapsed,
            "data/corrupt_samples": corrupt,
        }

    def perf(self, config: Config, world_size: int, peak: float | None, num_samples: int) -> dict[str, float]:
        """Achieved TFLOP/s per GPU, MFU and GPU-hours per epoch from the analytic model FLOPs."""
        return flops.perf_metrics(
            config,
            images_per_sec_per_gpu=self.images / self.elapsed,  # this rank's images
            context_tokens=self.context_tokens / max(1, self.images),
            target_tokens=self.target_tokens / max(1, self.images * config.mask.num_targets),
            peak=peak,
            images_per_epoch=num_samples,
        )

    def eta(self, step: int, stop_step: int) -> float:
        return (stop_step - step) * self.elapsed / max(1, step - self.start_step)


def build_knn_evaluator(config: Config):
    """Periodic kNN of the target encoder on a small labeled shard set (eval.knn_every)."""
    e = config.eval
    if not e.knn_every:
        return None
    from scalejepa.eval.knn import KnnEvaluator

    return KnnEvaluator(e.knn_train_shards, e.knn_val_shards, config.model.image_size, k=e.knn_k,
                        mean=config.data.mean, std=config.data.std)


def collapse_record(targets: torch.Tensor | None) -> dict[str, float]:
    """Collapse monitors on the last batch's targets (rows: target patches)."""
    if targets is None or targets.shape[0] < 2:
        return {}
    values = collapse_metrics(targets)
    return {"monitor/feature_std": values["feature_std"], "monitor/rankme": values["rankme"]}


def progress_line(step: int, total: int, record: dict, eta_s: float) -> str:
    return (
        f"step {step}/{total} ({100 * step / total:.1f}%) | loss {record['train/loss']:.4f} | "
        f"lr {record['train/lr']:.2e} | {record['perf/imgs_per_sec']:.1f} img/s | "
        f"data {record['perf/data_wait_pct']:.0f}% | ETA {format_seconds(eta_s)}"
    )


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(checkpointer: Checkpointer, step: int, engine, loader, config: Config, env: DistEnv) -> None:
    # Per-rank state (data position, RNG) is gathered so every rank writes the same blob.
    ranks = all_gather_objects({"data": loader.state.to_dict(), "rng": rng_state()})
    trainer = {"step": step, "world_size": env.world_size, "config": config.to_dict(),
               "data": [r["data"] for r in ranks]}
    extra = {"trainer": json.dumps(trainer), "rng": pickle.dumps([r["rng"] for r in ranks])}
    path = engine.save_checkpoint(checkpointer, step, extra)
    if env.is_main:
        log.info("checkpoint %s", path)


def restore(checkpointer: Checkpointer, path: Path, engine, env: DistEnv) -> tuple[int, LoaderState | None]:
    state = engine.load_checkpoint(checkpointer, path, {"trainer": "", "rng": b""})
    trainer = json.loads(state["trainer"])
    if trainer["world_size"] != env.world_size:
        log.warning("checkpoint written by %d ranks, resuming on %d: weights and optimizer are resharded, data "
                    "streams restart from fresh seeds", trainer["world_size"], env.world_size)
        return trainer["step"], None
    set_rng_state(pickle.loads(state["rng"])[env.rank])
    return trainer["step"], LoaderState.from_dict(trainer["data"][env.rank])


def export_target(engine, run_dir: Path, env: DistEnv) -> Path | None:
    """Plain target-encoder weights for evaluation (what the paper probes)."""
    weights = engine.export_target()
    if not env.is_main:
        return None
    path = run_dir / "export" / "target_encoder.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(weights, tmp)
    tmp.replace(path)
    return path


def print_summary(summary: dict) -> None:
    first, last = summary["first_loss"], summary["last_loss"]
    change = f"{first:.4f} -> {last:.4f}" if first is not None and last is not None else "n/a"
    print(f"\nscalejepa: trained {summary['steps']} steps, loss {change}")
    print(f"  run directory: {summary['run_dir']} (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"  TensorBoard:   tensorboard --logdir {summary['tensorboard']}")
    if summary["export"]:
        print(f"  target encoder weights: {summary['export']}")


if __name__ == "__main__":
    sys.exit(main())
