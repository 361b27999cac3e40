"""Train-step throughput of an I-JEPA preset: img/s per GPU, step time, TFLOP/s, MFU, peak
memory, and the GPU-hours projection against the paper's 1152 A100-hour budget.

Every variant (``_train_step_variants.py``: truncate vs pack, SDPA vs Triton vs the library
paths, none vs FSDP2, compile, activation checkpointing, the reference recipe and code) is
built by ``scalejepa.parallel.build_engine`` from the preset plus the variant's config
overrides and stepped by ``scalejepa.step.train_step``, the training loop's own step
(forward + backward, the finite-loss check, optimizer step, EMA), on synthetic images (random,
made on the device before timing) with real masks: a fixed pool of ``--mask-pool`` mask
batches, drawn before timing, that the steps cycle through, as a long run's shapes repeat (a
backend that prepares per shape, such as cuDNN's SDPA plans or an autotuner, pays it during
warm-up, which covers the pool). Data loading is excluded unless ``--loader`` is given. SDPA's
backend is pinned per variant (``model.sdpa_backend``; flash unless named), and one profiled
step after the timed ones records what ran (``attention_ran``: backends, operators, kernels)
and the time of each phase of the step (``phases_ms``, which ``scalejepa-plan --calibrate`` fits).

A variant that cannot be built or run (a backend that is not available, compile or
activation checkpointing requested but not applied, out of memory) is recorded with its
error message; the others still run. ``_harness.py`` runs the variants: each in a child
process with ``--isolate`` (the default on a GPU), under ``--time-budget``, saving after
every variant, resumable with ``--resume-json``.

Timing (``_timing.py``): ``--warmup`` steps, then ``--steps`` timed steps, each between two
device synchronisations (host overhead included, as in training); step time median, p10/p90,
min/max and every raw time are kept. Throughput = batch / median step time. FLOPs are the
model FLOPs of ``scalejepa.flops`` on each step's actual masks (useful work: no padding,
recompute or elementwise ops credited); MFU is against the dense bf16 peak of the GPU
(``scalejepa.flops.PEAK_BF16_TFLOPS``; none on CPU or an unknown GPU: ``--peak-tflops``).
The GPU-hours projection and the comparisons are ``_train_step_report.py``'s.

Commands::

    # the GPU run (ViT-H/14, 128 images per GPU, every variant; compile variants take minutes each)
    python benchmarks/train_step.py --preset vit_h14_in1k_ep300 --batch 128
    # a subset, more steps
    python benchmarks/train_step.py --variants truncate_sdpa,reference_baseline --steps 50
    # include the real loader (needs webdataset; shards with index.json)
    python benchmarks/train_step.py --variants truncate_sdpa --loader --shards /data/in1k-shards
    # CPU check of the script (tiny model, a few steps; not a measurement)
    python benchmarks/train_step.py --smoke --out-dir /tmp/bench

Writes ``train_step_<UTC stamp>.json`` (every number, device, versions, date, commit),
``.md`` (table) and ``.png`` (bar chart) to ``--out-dir`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _harness  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR, benchmark_device, ensure_importable, environment, output_path, progress, write_json,
)
from _profile import attention_ran, phases_ms, profiled  # noqa: E402
from _reference_ijepa import DEFAULT_REFERENCE_DIR  # noqa: E402
from _timing import free_memory, summarise_times, timed_steps  # noqa: E402
from _train_step_variants import SMOKE_VARIANTS, VARIANTS, Variant  # noqa: E402

ensure_importable()

from _train_step_batches import prepare_batches  # noqa: E402
from _train_step_report import markdown, projection, save  # noqa: E402

from scalejepa import flops  # noqa: E402
from scalejepa.config import Config, load_config  # noqa: E402
from scalejepa.dist_env import DistEnv, ensure_process_group, shutdown_distributed  # noqa: E402
from scalejepa.step import StepSchedule, train_step  # noqa: E402


# ----------------------------------------------------------------------------- checks
def single_device_env(device: torch.device) -> DistEnv:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("benchmarks/train_step.py measures one GPU: launch it without torchrun")
    return DistEnv(rank=0, world_size=1, local_rank=device.index or 0, device=device)


def compiled_modules(module: torch.nn.Module) -> int:
    """Modules compiled by ``nn.Module.compile`` or wrapped by ``torch.compile``."""
    return sum(1 for m in module.modules()
               if getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule")


def checkpointed_modules(module: torch.nn.Module) -> int:
    """Modules under activation checkpointing: ``checkpoint_wrapper`` (CheckpointWrapper),
    the composable ``torch.distributed._composable.checkpoint``, or an instance ``forward``
    replaced by a checkpointing function (``scalejepa.parallel.checkpoint_activations``)."""
    count = 0
    for m in module.modules():
        registry = m.__dict__.get("__composable_api_registry") or {}
        forward = m.__dict__.get("forward")
        if ("CheckpointWrapper" in type(m).__name__ or "checkpoint" in registry
                or "checkpoint" in getattr(forward, "__qualname__", "")):
            count += 1
    return count


# ----------------------------------------------------------------------------- one variant
def variant_config(args, variant: Variant) -> Config:
    overrides = ["data.synthetic=true", f"train.batch_size={args.batch}", "train.grad_accum=1",
                 f"train.seed={args.seed}", *variant.overrides, *args.override]
    if args.smoke:
        overrides = ["mask.min_keep=4", *overrides]
    return load_config(args.preset, overrides)


def time_reference_code(args, config: Config, device: torch.device, result: dict):
    """The reference repository's own step (under DDP, as it always runs): (config as run,
    losses, step times, per-step FLOPs, context and target tokens per image)."""
    from _reference_ijepa import ReferenceRunner

    ensure_process_group(single_device_env(device))
    runner = ReferenceRunner(args.reference_dir, config, args.batch, device, args.mask_pool,
                             arch=args.reference_arch or config.model.arch)
    result.update(reference_dir=str(args.reference_dir), arch=runner.arch, ddp=runner.ddp,
                  trainable_params=runner.num_params)
    if runner.arch != config.model.arch:
        result["note"] = f"reference code ran {runner.arch} (it has no {config.model.arch})"
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, arch=runner.arch))
    losses, times, _ = timed_steps(runner.step, args.warmup, args.steps, device, result["variant"])  # syncs
    result["attention_ran"] = attention_ran(profiled(lambda: runner.step(args.warmup + args.steps), device))
    lengths = [runner.lengths(i) for i in range(args.warmup + args.steps)]
    step_flops = [flops.step_flops(config, c, t).total for c, t in lengths]
    return config, losses, times, step_flops, [c[0] for c, _ in lengths], [t[0] for _, t in lengths]


def time_engine(args, variant: Variant, config: Config, device: torch.device, result: dict):
    """Our engine, as ``build_engine`` makes it for the variant's config, stepped by the
    training loop's step: (losses, step times, per-step FLOPs, context and target tokens
    per image)."""
    from scalejepa.parallel import build_engine

    engine = build_engine(config, single_device_env(device))
    if variant.compile and compiled_modules(engine.model) == 0:
        raise RuntimeError("distributed.compile=true was requested but build_engine compiled no module")
    if variant.activation_checkpointing and checkpointed_modules(engine.model) == 0:
        raise RuntimeError(
            f"distributed.activation_checkpointing=true was requested but build_engine applied it to no module "
            f"(backend={config.distributed.backend}); not timed, it would be the same as without")
    result.update(compiled_modules=compiled_modules(engine.model),
                  checkpointed_modules=checkpointed_modules(engine.model),
                  trainable_params=sum(p.numel() for p in engine.model.parameters()), **engine.implementation)
    schedule = StepSchedule(config.optim.lr, config.optim.weight_decay, config.optim.ema[0])
    timed = args.warmup + args.steps
    # One batch more than timed: the profiled step that records which kernels ran.
    host_masks, batches = prepare_batches(args, config, device, timed + 1)

    def step(i: int) -> tuple[float, float]:
        out = train_step(engine, lambda: batches(i), schedule, step=i)  # raises on a non-finite loss
        return float(out.loss), out.data_wait_s

    losses, times, data_s = timed_steps(step, args.warmup, args.steps, device, variant.name)
    prof = profiled(lambda: step(timed), device)
    result["attention_ran"] = attention_ran(prof)
    result["phases_ms"] = phases_ms(prof, device)  # what scalejepa-plan --calibrate fits
    if args.loader:
        result["data_wait_ms_median"] = statistics.median(data_s) * 1e3
    host_masks = host_masks[:timed]
    return (losses, times, [flops.batch_flops(config, m).total for m in host_masks],
            [m.context_tokens / args.batch for m in host_masks],
            [m.target_tokens / (args.batch * m.num_targets) for m in host_masks])


def run_variant(args, variant: Variant, device: torch.device) -> dict:
    """Build, warm up, time; returns the variant's numbers (raises on failure)."""
    config = variant_config(args, variant)
    batch, warmup = args.batch, args.warmup
    result: dict = {"variant": variant.name, "description": variant.description, **variant.tags,
                    "overrides": variant.overrides, "env": variant.env, "batch": batch, "arch": config.model.arch,
                    "precision": "bf16" if device.type == "cuda" and config.train.precision != "fp32" else "fp32"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if variant.reference_code:
        config, losses, times, step_flops, context_tokens, target_tokens = time_reference_code(
            args, config, device, result)
    else:
        losses, times, step_flops, context_tokens, target_tokens = time_engine(args, variant, config, device, result)

    stats = summarise_times(times)
    img_s = batch / (stats["step_ms_median"] / 1e3)
    flops_per_image = statistics.fmean(step_flops[warmup:]) / batch
    peak = args.peak_tflops if args.peak_tflops else flops.peak_tflops(device)
    result.update(stats)
    result.update(
        raw_step_ms=[t * 1e3 for t in times],
        img_s_per_gpu=img_s,
        img_s_per_gpu_mean=batch * len(times) / sum(times),
        gflops_per_image=flops_per_image / 1e9,
        tflops_per_gpu=flops_per_image * img_s / 1e12,
        mfu_pct=flops.mfu_pct(flops_per_image, img_s, peak),
        context_tokens_per_image=statistics.fmean(context_tokens[warmup:]),
        target_tokens_per_block=statistics.fmean(target_tokens[warmup:]),
        losses_first_last=[losses[0], losses[-1]],
    )
    if device.type == "cuda":
        result["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    result["projection"] = projection(config, img_s, peak)
    return result


def run_one(args, name: str, device: torch.device) -> dict:
    """One variant in this process, under its environment; a failure is a result."""
    variant = VARIANTS[name]
    progress(f"variant {name}: {variant.description}")
    saved_env = {k: os.environ.get(k) for k in variant.env}
    os.environ.update(variant.env)  # an isolated child was started with them already
    try:
        result = run_variant(args, variant, device)
    except Exception as exc:  # noqa: BLE001 - a variant that fails is a result: recorded with its message
        message = f"{type(exc).__name__}: {exc}"
        progress(f"  {name}: not measured ({message.splitlines()[0][:200]})")
        result = {"variant": name, "description": variant.description, **variant.tags, "env": variant.env,
                  "error": message[:2000], "traceback": traceback.format_exc()[-3000:]}
    else:
        mfu = result["mfu_pct"]
        progress(f"  {name}: {result['img_s_per_gpu']:.1f} img/s, step {result['step_ms_median']:.1f} ms "
                 f"(p10-p90 {result['step_ms_p10']:.1f}-{result['step_ms_p90']:.1f}), "
                 f"{result['tflops_per_gpu']:.2f} TFLOP/s" + (f", MFU {mfu:.1f}%" if mfu is not None else ""))
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if variant.compile:
            torch._dynamo.reset()
        free_memory(device)
    return result


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="variants: " + ", ".join(VARIANTS))
    p.add_argument("--preset", default="vit_h14_in1k_ep300", help="config preset or YAML path")
    p.add_argument("--batch", type=int, default=128, help="images per GPU")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--mask-pool", type=int, default=4,
                   help="mask batches the steps cycle through (drawn before timing; at most --warmup)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every variant (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for a GPU not in the table")
    p.add_argument("--loader", action="store_true", help="include the real data loader (needs webdataset)")
    p.add_argument("--shards", default="", help="shards for --loader (default: loader.py's scikit-image photo shards)")
    p.add_argument("--loader-workers", type=int, default=8)
    p.add_argument("--reference-dir", type=Path, default=DEFAULT_REFERENCE_DIR,
                   help="checkout of facebookresearch/ijepa for the reference_code variant")
    p.add_argument("--reference-arch", default="", help="architecture for reference_code (default: the preset's)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks the script")
    _harness.add_arguments(p)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = benchmark_device("train_step.py", args.smoke)
    if args.smoke:
        if args.preset == "vit_h14_in1k_ep300":
            args.preset = "debug_cpu"
        if args.batch == 128:
            args.batch = 4
        args.warmup, args.steps, args.mask_pool = min(args.warmup, 2), min(args.steps, 2), min(args.mask_pool, 2)
        if not args.reference_arch:
            args.reference_arch = "vit_tiny"  # the reference code has no vit_micro
        os.environ.setdefault("SCALEJEPA_AUTOTUNE", "0")
    if not args.loader and not 1 <= args.mask_pool <= max(args.warmup, 1):
        sys.exit(f"--mask-pool {args.mask_pool} must be between 1 and --warmup {args.warmup}: warm-up steps cover "
                 "the pool, so that no timed step meets a shape for the first time")
    if args.isolate is None:
        args.isolate = device.type == "cuda"
    threads = torch.get_num_threads()
    if args.smoke:  # one thread: a shared, loaded CPU makes multi-threaded tiny ops crawl
        torch.set_num_threads(1)
    try:
        return _main(args, device)
    finally:
        torch.set_num_threads(threads)


def _main(args, device: torch.device) -> Path:
    names = (SMOKE_VARIANTS if args.smoke else list(VARIANTS)) if args.variants == "all" else \
        [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    if args.child_out is not None:  # one variant for an isolating parent
        result = run_one(args, names[0], device)
        shutdown_distributed()
        return write_json(args.child_out, result)

    config = load_config(args.preset, args.override)
    env = environment(device)
    stats = flops.mask_stats(config, args.batch)
    settings = {"preset": args.preset, "arch": config.model.arch, "image_size": config.model.image_size,
                "patch_size": config.model.patch_size, "batch": args.batch, "warmup": args.warmup,
                "steps": args.steps, "mask_pool": args.mask_pool, "seed": args.seed, "overrides": args.override,
                "isolate": args.isolate, "loader": args.loader}
    results = {
        "benchmark": "train_step", "env": env, "smoke": args.smoke, "settings": settings,
        "data": (f"real loader ({args.shards or 'scikit-image RGB photo shards of benchmarks/loader.py'}, "
                 f"{args.loader_workers} workers)"
                 if args.loader else f"synthetic images on the device, real masks: a pool of {args.mask_pool} mask "
                                     "batches the steps cycle through (data loading excluded)"),
        "peak_tflops": args.peak_tflops if args.peak_tflops else flops.peak_tflops(device),
        "flop_convention": "model FLOPs (scalejepa.flops): matmuls, 2 per multiply-add, trained parts 3x forward, "
                           "target encoder forward only; no padding, recompute or elementwise work credited",
        "params": flops.param_counts(config),
        "expected_tokens_truncate": {"context_per_image": stats.context_tokens, "context_sampled": stats.context_sampled,
                                     "target_per_block": stats.target_tokens},
        "variants": [],
    }
    json_path = output_path(args.out_dir, "train_step", env, args.smoke)
    if args.resume_json is not None:
        json_path, results, names = _harness.resume(args, "train_step", results, names)
    results["pending"] = [n for n in names if n not in {v["variant"] for v in results["variants"]}]
    progress(f"train_step: {args.preset} ({config.model.arch}), batch {args.batch}, {env['device']}, "
             f"variants {', '.join(results['pending'])}" + (" [isolated]" if args.isolate else ""))
    try:
        _harness.run_pending(args, results, json_path, script=Path(__file__).resolve(), argv=args.argv,
                             measure=lambda name: run_one(args, name, device),
                             env_of=lambda name: {**os.environ, **VARIANTS[name].env}, save=save)
    finally:
        shutdown_distributed()
    save(results, json_path)
    progress(f"wrote {json_path} (+ .md" + ("" if results.get("chart_skipped") else ", .png") + ")")
    print(markdown(results))
    return json_path


if __name__ == "__main__":
    main()
