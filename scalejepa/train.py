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
from that checkpoint. ``--init-from SOURCE`` starts a new run at step 0 from other weights
(a reference checkpoint, a run, an export, a Hugging Face or timm directory; see
scalejepa.init_from). Overrides are ``section.key=value``; ``--help`` lists the presets.

Exit status: 0 done (or stopped at train.stop_at_step), 1 error, 2 config error, 75
preempted (a signal of train.preempt_signals: checkpoint committed, ``RUN/PREEMPTED``
written; see scalejepa.preempt). Only one run at a time may use a run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from scalejepa.checkpoint import Checkpointer, CheckpointError, TrainState
from scalejepa.config import (
    Config,
    ConfigError,
    config_yaml,
    divide_batch,
    load_config,
    preset_names,
    save_config,
)
from scalejepa.data import cache
from scalejepa.data.pipeline import ShardDataError, SyntheticLoader, TrainLoader
from scalejepa.data.shard_index import ShardIndexError
from scalejepa.dist_env import DistEnv, barrier, init_distributed, shutdown_distributed
from scalejepa.eval.knn import KnnEvaluator
from scalejepa.eval.spec import EncoderSpec, EncoderWeights, WeightsError
from scalejepa.export import write_export
from scalejepa.init_from import init_for_run, write_record
from scalejepa.layout import RunDir, step_of
from scalejepa.masks import MaskGenerator
from scalejepa.metrics import MetricsProcessor, knn_scalars, progress_line
from scalejepa.parallel import autocast_dtype, build_engine
from scalejepa.preempt import PREEMPTED_EXIT_CODE, PreemptionFlag, parse_signals, restarted_after_preemption, write_marker
from scalejepa.run_lock import RunLock, RunLockedError
from scalejepa.schedules import Schedules
from scalejepa.step import NonFiniteLossError, StepSchedule, train_step

log = logging.getLogger("scalejepa.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scalejepa-train",
        description="I-JEPA pretraining.",
        epilog=f"presets: {', '.join(preset_names())}",
    )
    parser.add_argument("--config", required=True, help="preset name or path to a YAML file")
    parser.add_argument("--run-dir", required=True, type=Path, help="where config, metrics, logs and checkpoints go")
    parser.add_argument("--resume", default="auto", help="auto (default) | never | PATH to a checkpoint step directory")
    parser.add_argument("--init-from", metavar="SOURCE",
                        help="start at step 0 from these weights: a reference I-JEPA .pth.tar, a run or checkpoint "
                             "step directory, an export (.pt, .safetensors, scalejepa-export directory), a Hugging "
                             "Face IJepaModel or timm directory (sets checkpoint.init_from)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        init_from = args.init_from or config.checkpoint.init_from
        if init_from:  # an absolute path: the run's record of where its weights came from
            config = dataclasses.replace(config, checkpoint=dataclasses.replace(
                config.checkpoint, init_from=str(Path(init_from).expanduser().absolute())))
    except ConfigError as exc:
        print(f"scalejepa-train: config error: {exc}", file=sys.stderr)
        return 2
    previous = restarted_after_preemption(RunDir(args.run_dir))
    if previous is not None:  # torchrun restarting workers it lost to a preemption: the job is ending
        print(f"scalejepa-train: the previous attempt was preempted at step {previous['step']} "
              f"({previous['signal']}); not restarting inside this allocation", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    env = init_distributed(config.train.device)
    try:
        summary = train(config, args.run_dir, args.resume, env, preset=args.config)
        barrier()
    except ConfigError as exc:  # found once the world size, grid or data are known
        print(f"scalejepa-train: config error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, ShardIndexError, ShardDataError, FileNotFoundError,
            RunLockedError, WeightsError) as exc:
        print(f"scalejepa-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return PREEMPTED_EXIT_CODE if summary["preempted"] else 0


@contextlib.contextmanager
def run_guard(config: Config, run: RunDir, env: DistEnv) -> Iterator[PreemptionFlag]:
    """Hold the run directory (rank 0's lock; every rank raises the same error if it is
    taken) and the preemption signal handlers for the run's lifetime."""
    lock, error = RunLock(run.lock), ""
    if env.is_main:
        try:
            lock.acquire()
            run.preempted.unlink(missing_ok=True)  # this run starts: the marker is about the last one
        except RunLockedError as exc:
            error = str(exc)
    if env.distributed and torch.distributed.is_initialized():  # one collective at start-up: no rank goes on alone
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise RunLockedError(error)
    flag = PreemptionFlag(parse_signals(config.train.preempt_signals))
    try:
        yield flag
    finally:
        flag.close()
        lock.release()


def train(config: Config, run_dir: Path, resume: str, env: DistEnv, preset: str = "") -> dict:
    """``preset``: the --config the run came from, recorded in its config.yaml."""
    run = RunDir(run_dir)
    # Checks that need the world size or the patch grid, before anything is written.
    per_rank_batch = divide_batch(config.train.batch_size, env.world_size, config.train.grad_accum)
    mask_generator = MaskGenerator(config.model.image_size // config.model.patch_size, config.mask)
    with run_guard(config, run, env) as preempt:
        return _train(config, run, resume, env, preempt, per_rank_batch, mask_generator, preset)


def _train(config: Config, run: RunDir, resume: str, env: DistEnv, preempt: PreemptionFlag, per_rank_batch: int,
           mask_generator: MaskGenerator, preset: str) -> dict:
    # ---------------------------------------------------------------- setup
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    t = config.train
    checkpointer = Checkpointer(run.checkpoints, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    resume_from = find_resume_checkpoint(checkpointer, resume)
    init = init_for_run(config.checkpoint.init_from, run, resume, resume_from)
    if init is not None:
        init.check(config.model)  # names, shapes and head counts: a mismatch stops here, before any write
    if env.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config, preset)
        write_record(init, run, resumes=resume_from is not None)
        for note in init.notes if init is not None else ():
            log.info("init: %s", note)

    # ---------------------------------------------------------------- data size and schedules
    urls, num_samples = resolve_data(config, env)
    steps_per_epoch = max(1, num_samples // t.batch_size)
    total_steps = t.steps or max(1, round(t.epochs * steps_per_epoch))
    warmup_steps = round(total_steps * min(config.optim.warmup_epochs / t.epochs, 1.0)) if t.epochs > 0 else 0
    schedules = Schedules(total_steps, warmup_steps, config.optim)
    stop_step = min(t.stop_at_step or total_steps, total_steps)

    # ---------------------------------------------------------------- model, parallelism, optimizer
    engine = build_engine(config, env, init)
    del init  # the models hold the weights now

    # ---------------------------------------------------------------- resume
    train_state = TrainState(env.rank, env.world_size)
    if resume_from is not None:
        restore(checkpointer, resume_from, engine, train_state, env)
    start_step = train_state.step

    # ---------------------------------------------------------------- data
    loader = build_loader(config, urls, per_rank_batch, mask_generator, env, start_step, train_state.data)
    train_state.data = loader.state  # updated in place by the loader, saved with every checkpoint

    # ---------------------------------------------------------------- loop
    metrics = MetricsProcessor(config, run, device=env.device, world_size=env.world_size, is_main=env.is_main,
                               images_per_epoch=num_samples, steps_per_epoch=steps_per_epoch, data=loader,
                               resume_step=start_step if resume_from else None)
    if env.is_main:
        log.info(
            "training %s for %d steps (%d per epoch, %d warm-up) from step %d, global batch %d = %d ranks x %d x %d accum",
            config.model.arch, total_steps, steps_per_epoch, schedules.warmup, start_step, t.batch_size,
            env.world_size, per_rank_batch // t.grad_accum, t.grad_accum,
        )
    knn = build_knn_evaluator(config)
    config_text = config_yaml(config, preset)
    profiler = build_profiler(config, run, env, start_step, stop_step)
    if knn is not None and start_step == 0 and stop_step >= config.eval.knn_every:
        # the random-init value that the later kNN points are read against
        metrics.write(0, knn_scalars(knn_scores(knn, engine, config, env)))
    first_loss = last_loss = None
    preempted = False
    for step in range(start_step, stop_step):
        schedule = StepSchedule(schedules.lr(step), schedules.weight_decay(step), schedules.ema_momentum(step))
        done = step + 1
        knn_step = knn is not None and done % config.eval.knn_every == 0
        log_step = done % t.log_every == 0 or done == stop_step or knn_step
        result = train_step(engine, loader.__next__, schedule, step=step, grad_accum=t.grad_accum,
                            keep_targets=log_step and env.is_main,  # for the collapse monitors
                            before_update=checkpointer.wait,  # an async save must finish reading the weights
                            stop_requested=lambda: preempt.requested)
        metrics.record_step(result)
        if profiler is not None:
            profiler.step()
        preempted = result.stop and done < stop_step

        if log_step or preempted:  # a preempted run logs its last steps before it stops
            # kNN on every rank: a sharded encoder's forward is collective
            scores = knn_scores(knn, engine, config, env) if knn_step else None
            record = metrics.log_and_reset(done, schedule, targets=engine.last_targets if env.is_main else None,
                                           knn_scores=scores)
            first_loss = record["train/loss"] if first_loss is None else first_loss
            last_loss = record["train/loss"]
            if env.is_main:
                log.info(progress_line(done, total_steps, record, (stop_step - done) * record["perf/step_time_s"]))
        if preempted or done == stop_step or (config.checkpoint.interval and done % config.checkpoint.interval == 0):
            path = checkpointer.save(done, engine, train_state, config_text)
            if env.is_main:
                log.info("checkpoint %s", path)
        if preempted:
            checkpointer.wait()  # committed before the marker says so
            if env.is_main:
                write_marker(run, done, path, preempt.received)
                log.warning("preempted at step %d: checkpoint %s committed, exiting with status %d",
                            done, path, PREEMPTED_EXIT_CODE)
            stop_step = done
            break

    if profiler is not None:
        profiler.stop()
    checkpointer.wait()
    metrics.close()
    export_path = export_target(engine, config, run, stop_step, env) if stop_step == total_steps else None
    summary = {"steps": stop_step, "first_loss": first_loss, "last_loss": last_loss, "run_dir": str(run.root),
               "tensorboard": str(run.tensorboard), "export": str(export_path) if export_path else None,
               "preempted": preempted}
    if env.is_main:
        print_summary(summary)
    return summary


# ---------------------------------------------------------------------------- helpers


def resolve_data(config: Config, env: DistEnv) -> tuple[list[str], int]:
    """(shard URLs, images per epoch)."""
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
    if step_of(path) is None:
        raise CheckpointError(f"--resume {resume} is not a checkpoint directory (expected a name like step_00001000)")
    return path


def build_knn_evaluator(config: Config) -> KnnEvaluator | None:
    """Periodic kNN of the target encoder on a small labeled shard set (eval.knn_every)."""
    e = config.eval
    if not e.knn_every:
        return None
    return KnnEvaluator(e.knn_train_shards, e.knn_val_shards, config.model.image_size, k=e.knn_k,
                        mean=config.data.mean, std=config.data.std)


def knn_scores(knn: KnnEvaluator, engine, config: Config, env: DistEnv) -> dict[str, float]:
    """kNN top-1/top-5 of the target encoder and its validation tokens' position share."""
    return knn(engine.eval_encoder, env.device, autocast_dtype(config, env.device))


def restore(checkpointer: Checkpointer, path: Path, engine, train_state: TrainState, env: DistEnv) -> None:
    written_by = checkpointer.written_by(path)
    if written_by != env.world_size:
        train_state.with_rank_state = False
        if env.is_main:
            log.warning("checkpoint written by %d ranks, resuming on %d: weights and optimizer are resharded, data "
                        "streams restart from fresh seeds", written_by, env.world_size)
    checkpointer.load(path, engine, train_state)
    if env.is_main:
        log.info("resumed from %s at step %d", path, train_state.step)


def export_target(engine, config: Config, run: RunDir, step: int, env: DistEnv) -> Path | None:
    """Plain target-encoder weights + sidecar for evaluation (what the paper probes),
    written as ``scalejepa-export`` writes them."""
    weights = engine.export_target()  # collective: every rank takes part
    if not env.is_main:
        return None
    path, _ = write_export(EncoderWeights(weights, EncoderSpec.from_config(config), source=str(run.root), step=step,
                                          seed=config.train.seed), run.export)
    return path


def build_profiler(config: Config, run: RunDir, env: DistEnv, start_step: int, stop_step: int):
    """A started ``torch.profiler`` recording steps [profile.start, profile.start +
    profile.steps) of this run's range, written per rank by ``tensorboard_trace_handler``
    (``RUN/profile/rank<r>.<time>.pt.trace.json``); None when off or out of range."""
    p = config.profile
    first, end = max(p.start, start_step), min(p.start + p.steps, stop_step)
    if not p.enabled or first >= end:
        if p.enabled and env.is_main:
            log.warning("profile: steps %d-%d are outside this run's steps %d-%d, nothing is traced",
                        p.start, p.start + p.steps - 1, start_step, stop_step - 1)
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    skip = first - start_step  # one step of warm-up where there is room, as torch.profiler recommends
    warmup = min(skip, 1)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=skip - warmup, warmup=warmup, active=end - first, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run.profile), worker_name=f"rank{env.rank}"),
        record_shapes=True,
    )
    profiler.start()
    return profiler


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
