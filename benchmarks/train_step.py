"""Train-step throughput of an I-JEPA preset: img/s per GPU, step time, TFLOP/s, MFU, peak
memory, and the GPU-hours projection against the paper's 1152 A100-hour budget.

Every variant is built by ``scalejepa.parallel.build_engine`` from the preset plus config
overrides and stepped by ``scalejepa.step.train_step``, the training loop's own step
(forward + backward, the finite-loss check, optimizer step, EMA), on synthetic images (random, made on
the device before timing) with real masks: a fixed pool of ``--mask-pool`` mask batches, drawn
before timing, that the steps cycle through, as a long run's shapes repeat (a backend that
prepares per shape, such as cuDNN's SDPA plans or an autotuner, pays it during warm-up, which
covers the pool). Data loading is excluded unless ``--loader`` is given. SDPA's backend is
pinned per variant (``model.sdpa_backend``; flash unless named), and one profiled step after
the timed ones records what ran (``attention_ran``: backends, operators, kernels). Variants:

================================  ==============================================================
``truncate_sdpa``                 batch-min truncation (the reference masks), SDPA (flash): the default
``truncate_sdpa_cudnn``           truncation, SDPA pinned to cuDNN, TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1
``truncate_triton``               truncation, Triton attention and gathers
``pack_triton``                   every sampled context token kept, packed varlen (Triton): the headline
``pack_sdpa``                     packed contexts, SDPA (efficient: flash takes no mask) padded to the longest
``pack_sdpa_nested``              packed contexts, SDPA (flash) on nested jagged tensors
``pack_torch_varlen``             packed contexts, torch.nn.attention.varlen
``truncate_sdpa_compile``         + ``torch.compile`` of every block
``truncate_triton_compile``       Triton + compile
``pack_triton_compile``           pack + Triton + compile
``truncate_sdpa_ac``              + activation checkpointing
``truncate_sdpa_fsdp2``           ``distributed.backend=fsdp2`` on a 1-rank process group
``truncate_sdpa_fsdp2_ac``        FSDP2 + activation checkpointing
``reference_baseline``            the reference recipe's per-step work on our code: truncation,
                                  eager softmax(QK^T)V attention, per-parameter EMA loop,
                                  non-fused AdamW, no compile
``reference_code``                the reference repository itself (``third_party/ijepa``, see
                                  ``benchmarks/_reference_ijepa.py``), if present
================================  ==============================================================

A variant that cannot be built or run (a backend that is not available, compile or
activation checkpointing requested but not applied, out of memory) is recorded with its
error message; the others still run. ``--isolate`` (the default on a GPU) runs each variant
in a child process so that an out-of-memory error or a crashed kernel cannot affect the next.

Timing: ``--warmup`` steps, then ``--steps`` timed steps, each between two device
synchronisations (host overhead included, as in training); step time median, p10/p90,
min/max and every raw time are kept. Throughput = batch / median step time. FLOPs are the
model FLOPs of ``scalejepa.flops`` on each step's actual masks (useful work: no padding,
recompute or elementwise ops credited); MFU is against the dense bf16 peak of the GPU
(``scalejepa.flops.PEAK_BF16_TFLOPS``; none on CPU or an unknown GPU: ``--peak-tflops``).

Projection: GPU-hours per epoch = images per epoch / (img/s per GPU) / 3600, and for the
preset's schedule (epochs x that). Compute only, perfect scaling: ``benchmarks/scaling.py``
adds communication for N GPUs. Compared with the paper's 16 A100s x 72 h = 1152 A100-hours
two ways: counting one hour of this GPU as one A100-hour, and normalised by the ratio of
dense bf16 peaks (i.e. assuming an A100 would run this code at the same MFU).

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
import gc
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    RESULTS_DIR, benchmark_device, ensure_importable, environment, output_path, progress, provenance_line,
    pyplot, save_figure, write_json, write_report,
)
from _profile import attention_ran, profiled  # noqa: E402
from _reference_ijepa import DEFAULT_REFERENCE_DIR  # noqa: E402

ensure_importable()

from scalejepa import flops  # noqa: E402
from scalejepa.config import Config, load_config, validate  # noqa: E402
from scalejepa.dist_env import DistEnv, ensure_process_group, shutdown_distributed  # noqa: E402
from scalejepa.step import StepSchedule, train_step  # noqa: E402

# Goals of the benchmark issue (H100, ViT-H/14, batch 128).
TARGETS = {"img_s_per_gpu_truncate": 600.0, "mfu_pct_truncate": 40.0, "speedup_vs_reference_baseline": 3.0}


@dataclass
class Variant:
    name: str
    overrides: list[str]
    description: str
    reference_recipe: bool = False  # per-parameter EMA loop + non-fused AdamW
    reference_code: bool = False
    env: dict = field(default_factory=dict)  # environment variables the variant runs under
    tags: dict = field(default_factory=dict)


def _v(name, overrides, description, **kw) -> Variant:
    context = next((o.split("=")[1] for o in overrides if o.startswith("mask.context=")), "truncate")
    attn = next((o.split("=")[1] for o in overrides if o.startswith("model.attn_impl=")), "sdpa")
    sdpa_backend = next((o.split("=")[1] for o in overrides if o.startswith("model.sdpa_backend=")), "auto")
    tags = {"context": context, "attn_impl": attn, "sdpa_backend": sdpa_backend,
            "backend": next((o.split("=")[1] for o in overrides if o.startswith("distributed.backend=")), "none"),
            "compile": "distributed.compile=true" in overrides,
            "activation_checkpointing": "distributed.activation_checkpointing=true" in overrides}
    return Variant(name, overrides, description, tags=tags, **kw)


FLASH = "model.sdpa_backend=flash"
VARIANTS: dict[str, Variant] = {v.name: v for v in [
    _v("truncate_sdpa", ["mask.context=truncate", "model.attn_impl=sdpa", FLASH], "truncation, SDPA (flash, default)"),
    _v("truncate_sdpa_cudnn", ["mask.context=truncate", "model.attn_impl=sdpa", "model.sdpa_backend=cudnn"],
       "truncation, SDPA pinned to cuDNN", env={"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}),
    _v("truncate_triton", ["mask.context=truncate", "model.attn_impl=triton"], "truncation, Triton kernels"),
    _v("pack_triton", ["mask.context=pack", "model.attn_impl=triton"], "full contexts packed, Triton varlen"),
    _v("pack_sdpa", ["mask.context=pack", "model.attn_impl=sdpa", "model.sdpa_backend=efficient"],
       "full contexts, SDPA (efficient) padded to longest"),
    _v("pack_sdpa_nested", ["mask.context=pack", "model.attn_impl=sdpa_nested", FLASH],
       "full contexts packed, SDPA (flash) on nested jagged tensors"),
    _v("pack_torch_varlen", ["mask.context=pack", "model.attn_impl=torch_varlen"],
       "full contexts packed, torch.nn.attention.varlen"),
    _v("truncate_sdpa_compile", ["mask.context=truncate", "model.attn_impl=sdpa", FLASH, "distributed.compile=true"],
       "truncation, SDPA, torch.compile"),
    _v("truncate_triton_compile", ["mask.context=truncate", "model.attn_impl=triton", "distributed.compile=true"],
       "truncation, Triton, torch.compile"),
    _v("pack_triton_compile", ["mask.context=pack", "model.attn_impl=triton", "distributed.compile=true"],
       "pack, Triton, torch.compile"),
    _v("truncate_sdpa_ac", ["mask.context=truncate", "model.attn_impl=sdpa", FLASH,
                            "distributed.activation_checkpointing=true"], "truncation, SDPA, activation ckpt"),
    _v("truncate_sdpa_fsdp2", ["mask.context=truncate", "model.attn_impl=sdpa", FLASH, "distributed.backend=fsdp2"],
       "truncation, SDPA, FSDP2 on 1 GPU"),
    _v("truncate_sdpa_fsdp2_ac", ["mask.context=truncate", "model.attn_impl=sdpa", FLASH, "distributed.backend=fsdp2",
                                  "distributed.activation_checkpointing=true"],
       "truncation, SDPA, FSDP2 on 1 GPU, activation ckpt"),
    _v("reference_baseline", ["mask.context=truncate", "model.attn_impl=eager"],
       "reference recipe on our code: truncation, eager attention, EMA loop, non-fused AdamW", reference_recipe=True),
    _v("reference_code", ["mask.context=truncate", "model.attn_impl=eager"],
       "the reference repository's code (third_party/ijepa)", reference_code=True),
]}
# Triton variants take ~15 s a step in the CPU interpreter and compile ~1 min: not in the smoke
# default; nor are the variants whose kernels exist only on CUDA (efficient and cuDNN SDPA,
# torch.nn.attention.varlen, flash on nested tensors).
SMOKE_VARIANTS = ["truncate_sdpa", "truncate_sdpa_fsdp2", "truncate_sdpa_ac", "truncate_sdpa_fsdp2_ac",
                  "reference_baseline", "reference_code"]


# ----------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step_fn, warmup: int, steps: int, device: torch.device, name: str):
    """Run ``warmup + steps`` steps, each between two device syncs; returns (losses of all
    steps, step times and data times of the timed ones). ``step_fn(i)`` returns the loss,
    or (loss, seconds spent getting the batch)."""
    losses, times, data_s = [], [], []
    for i in range(warmup + steps):
        if i == warmup:
            progress(f"  {name}: warm-up done, timing {steps} steps")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = step_fn(i)
        loss, t_data = out if isinstance(out, tuple) else (out, 0.0)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            data_s.append(t_data)
        losses.append(loss)
    return losses, times, data_s


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    config = load_config(args.preset, overrides)
    validate(config)
    return config


def draw_masks(config: Config, batch: int, count: int, seed: int):
    from scalejepa.masks import MaskGenerator, mask_rng

    generator = MaskGenerator(config.model.image_size // config.model.patch_size, config.mask)
    return [generator(batch, mask_rng(seed, 0, 0, i)) for i in range(count)]


def summarise_times(times_s: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times_s)

    def pct(p):
        k = (len(ms) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    return {"step_ms_median": statistics.median(ms), "step_ms_mean": statistics.fmean(ms),
            "step_ms_p10": pct(0.1), "step_ms_p90": pct(0.9), "step_ms_min": ms[0], "step_ms_max": ms[-1],
            "step_ms_stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0}


def run_variant(args, variant: Variant, device: torch.device) -> dict:
    """Build, warm up, time; returns the variant's numbers (raises on failure)."""
    config = variant_config(args, variant)
    batch, steps, warmup = args.batch, args.steps, args.warmup
    result: dict = {"variant": variant.name, "description": variant.description, **variant.tags,
                    "overrides": variant.overrides, "env": variant.env, "batch": batch, "arch": config.model.arch,
                    "precision": "bf16" if device.type == "cuda" and config.train.precision != "fp32" else "fp32"}
    schedule = StepSchedule(config.optim.lr, config.optim.weight_decay, config.optim.ema[0])
    env = single_device_env(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if variant.reference_code:
        from _reference_ijepa import ReferenceRunner

        ensure_process_group(env)  # the reference always runs under DDP
        arch = args.reference_arch or config.model.arch
        runner = ReferenceRunner(args.reference_dir, config, batch, device, args.mask_pool, arch=arch)
        result.update(reference_dir=str(args.reference_dir), arch=runner.arch, ddp=runner.ddp,
                      trainable_params=runner.num_params)
        if runner.arch != config.model.arch:
            result["note"] = f"reference code ran {runner.arch} (it has no {config.model.arch})"
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, arch=runner.arch))
        losses, times, _ = timed_steps(runner.step, warmup, steps, device, variant.name)  # float(loss) syncs
        result["attention_ran"] = attention_ran(profiled(lambda: runner.step(warmup + steps), device))
        lengths = [runner.lengths(i) for i in range(warmup + steps)]
        step_flops = [flops.step_flops(config, c, t).total for c, t in lengths]
        context_tokens = [c[0] for c, _ in lengths]
        target_tokens = [t[0] for _, t in lengths]
        del runner
    else:
        from scalejepa.parallel import build_engine

        engine = build_engine(config, env)
        if variant.tags["compile"] and compiled_modules(engine.model) == 0:
            raise RuntimeError("distributed.compile=true was requested but build_engine compiled no module")
        if variant.tags["activation_checkpointing"] and checkpointed_modules(engine.model) == 0:
            raise RuntimeError(
                f"distributed.activation_checkpointing=true was requested but build_engine applied it to no module "
                f"(backend={config.distributed.backend}); not timed, it would be the same as without")
        result["compiled_modules"] = compiled_modules(engine.model)
        result["checkpointed_modules"] = checkpointed_modules(engine.model)
        result["trainable_params"] = sum(p.numel() for p in engine.model.parameters())
        if variant.reference_recipe:
            apply_reference_recipe(engine, config, device)
        result["ema"] = "per-parameter loop" if not getattr(engine.ema, "foreach", True) else "foreach lerp"
        result["optimizer"] = optimizer_kind(engine.optimizer)

        # One batch more than timed: the profiled step that records which kernels ran.
        host_masks, batches = prepare_batches(args, config, device, warmup + steps + 1)

        def timed_step(i: int) -> tuple[float, float]:
            result = train_step(engine, lambda: batches(i), schedule, step=i)  # raises on a non-finite loss
            return float(result.loss), result.data_wait_s

        losses, times, data_s = timed_steps(timed_step, warmup, steps, device, variant.name)
        result["attention_ran"] = attention_ran(profiled(lambda: timed_step(warmup + steps), device))
        host_masks = host_masks[:warmup + steps]
        if args.loader:
            result["data_wait_ms_median"] = statistics.median(data_s) * 1e3
        step_flops = [flops.batch_flops(config, m).total for m in host_masks]
        context_tokens = [m.context_tokens / batch for m in host_masks]
        target_tokens = [m.target_tokens / (batch * m.num_targets) for m in host_masks]
        del engine, batches, host_masks

    timed_flops = step_flops[warmup:]
    stats = summarise_times(times)
    step_s = stats["step_ms_median"] / 1e3
    img_s = batch / step_s
    flops_per_image = statistics.fmean(timed_flops) / batch
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


def apply_reference_recipe(engine, config: Config, device: torch.device) -> None:
    """The reference's EMA (one parameter at a time) and optimizer (torch's default AdamW:
    multi-tensor, not fused) on a production engine."""
    from scalejepa.ema import EMA
    from scalejepa.parallel.engine import param_groups

    if not hasattr(engine, "ema") or not hasattr(engine, "optimizer"):
        raise RuntimeError(f"{type(engine).__name__} has no .ema/.optimizer to set the reference recipe on")
    engine.ema = EMA(engine.target, engine.model.encoder, foreach=False)
    o = config.optim
    engine.optimizer = torch.optim.AdamW(param_groups(engine.model), lr=o.lr, betas=o.betas, eps=o.eps)


def optimizer_kind(optimizer) -> str:
    d = getattr(optimizer, "defaults", {})
    mode = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "torch default: foreach on CUDA"
    return f"{type(optimizer).__name__} ({mode})"


@dataclass
class SyntheticBatch:
    images: torch.Tensor
    masks: Any


def prepare_batches(args, config: Config, device: torch.device, count: int):
    """(host masks of each of ``count`` steps, fn(step) -> a batch with ``.images`` and device
    ``.masks``). Synthetic: random images made before timing; step i takes mask batch
    ``i % --mask-pool`` of a pool drawn before timing; ``--loader``: the real TrainLoader
    (its masks are read from each batch as it comes)."""
    if args.loader:
        return loader_batches(args, config, device, count)
    pool = draw_masks(config, args.batch, args.mask_pool, args.seed)
    device_masks = [m.to(device) for m in pool]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    size = config.model.image_size
    images = [torch.randn(args.batch, 3, size, size, device=device, generator=gen) for _ in range(2)]
    host = [pool[i % len(pool)] for i in range(count)]
    return host, lambda i: SyntheticBatch(images[i % 2], device_masks[i % len(pool)])


def loader_batches(args, config: Config, device: torch.device, count: int):
    from loader import photo_shards  # benchmarks/loader.py: RGB photo shards, cached

    from scalejepa.data.cache import default_cache_root, resolve_shards
    from scalejepa.data.pipeline import TrainLoader
    from scalejepa.masks import MaskGenerator

    shards = args.shards or str(photo_shards(default_cache_root().parent / "loader-bench", crops=24, max_side=500,
                                             quality=90))
    urls, _ = resolve_shards(shards)
    generator = MaskGenerator(config.model.image_size // config.model.patch_size, config.mask)
    loader = TrainLoader(urls, batch_size=args.batch, image_size=config.model.image_size,
                         crop_scale=config.data.crop_scale, mean=config.data.mean, std=config.data.std,
                         mask_generator=generator, seed=args.seed, num_workers=args.loader_workers,
                         shuffle_buffer=min(config.data.shuffle_buffer, 256), jpeg_draft=config.data.jpeg_draft,
                         device=device)
    # Masks are only known when a batch arrives: the list fills in as the loader delivers.
    host: list = [None] * count

    def next_batch(i):
        batch = next(loader)
        host[i] = batch.masks  # read (a sync) only after the timed loop
        return batch

    return host, next_batch


def projection(config: Config, img_s: float, peak: float | None) -> dict:
    images_per_epoch = config.data.num_samples or flops.PAPER_IMAGES_PER_EPOCH
    per_epoch = flops.gpu_hours(images_per_epoch, img_s)
    schedule = per_epoch * config.train.epochs
    out = {
        "images_per_epoch": images_per_epoch,
        "images_per_epoch_source": "data.num_samples" if config.data.num_samples else
                                   "ImageNet-1k (the preset sets no data.num_samples)",
        "epochs": config.train.epochs,
        "gpu_hours_per_epoch": per_epoch,
        "gpu_hours_schedule": schedule,
        "paper_a100_hours": flops.PAPER_A100_HOURS,
        "paper_budget_over_ours_1to1": flops.PAPER_A100_HOURS / schedule,
        "assumption": "compute only at the measured single-GPU rate (no communication, perfect scaling); "
                      "'1to1' counts one hour of this GPU as one A100-hour; 'peak_normalised' converts our "
                      "GPU-hours to A100-hours by the ratio of dense bf16 peaks (an A100 at the same MFU)",
        "same_run_as_paper": (config.model.arch == "vit_huge" and config.model.patch_size == 14
                              and config.model.image_size == 224 and images_per_epoch == flops.PAPER_IMAGES_PER_EPOCH
                              and config.train.epochs == flops.PAPER_EPOCHS),
    }
    if peak:
        a100 = flops.peak_tflops_for_name("A100")
        out["a100_equivalent_hours_schedule"] = schedule * peak / a100
        out["paper_budget_over_ours_peak_normalised"] = flops.PAPER_A100_HOURS / out["a100_equivalent_hours_schedule"]
    return out


# ----------------------------------------------------------------------------- isolation
def run_isolated(args, name: str, device: torch.device) -> dict:
    """Runs one variant in a child process; its JSON result, or an error record."""
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        out = Path(tmp) / "variant.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv_for_child, "--variants", name,
               "--child-out", str(out), "--no-isolate"]
        env = {**os.environ, **VARIANTS[name].env}
        try:
            proc = subprocess.run(cmd, timeout=args.variant_timeout, stderr=subprocess.PIPE, text=True, env=env)
        except subprocess.TimeoutExpired:
            return {"variant": name, "error": f"timed out after {args.variant_timeout} s (--variant-timeout)"}
        sys.stderr.write(proc.stderr[-4000:])
        if out.is_file():
            import json

            return json.loads(out.read_text())
        return {"variant": name, "error": f"child process exited with {proc.returncode} and no result: "
                                          f"{proc.stderr.strip()[-1500:]}"}


def run_one(args, name: str, device: torch.device) -> dict:
    progress(f"variant {name}: {VARIANTS[name].description}")
    saved_env = {k: os.environ.get(k) for k in VARIANTS[name].env}
    os.environ.update(VARIANTS[name].env)  # an isolated child was started with them already
    try:
        result = run_variant(args, VARIANTS[name], device)
    except Exception as exc:  # noqa: BLE001 - a variant that fails is a result: recorded with its message
        message = f"{type(exc).__name__}: {exc}"
        progress(f"  {name}: not measured ({message.splitlines()[0][:200]})")
        result = {"variant": name, "description": VARIANTS[name].description, **VARIANTS[name].tags,
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
        if name.endswith("compile"):
            torch._dynamo.reset()
        free_memory(device)
    return result


# ----------------------------------------------------------------------------- report
def compare(results: dict) -> None:
    by_name = {v["variant"]: v for v in results["variants"]}
    base = by_name.get("reference_baseline", {}).get("img_s_per_gpu")
    code = by_name.get("reference_code", {}).get("img_s_per_gpu")
    for v in results["variants"]:
        if "img_s_per_gpu" not in v:
            continue
        if base:
            v["speedup_vs_reference_baseline"] = v["img_s_per_gpu"] / base
        if code:
            v["speedup_vs_reference_code"] = v["img_s_per_gpu"] / code
    ours = [v for v in results["variants"] if "img_s_per_gpu" in v and not v["variant"].startswith("reference")]
    truncate = [v for v in ours if v["context"] == "truncate"]
    headline = {}
    if ours:
        best = max(ours, key=lambda v: v["img_s_per_gpu"])
        headline["best_variant"] = best["variant"]
        headline.update({k: best.get(k) for k in ("img_s_per_gpu", "mfu_pct", "tflops_per_gpu",
                                                   "speedup_vs_reference_baseline", "speedup_vs_reference_code")})
        headline["gpu_hours_schedule"] = best["projection"]["gpu_hours_schedule"]
        headline["paper_a100_hours"] = flops.PAPER_A100_HOURS
    if truncate:
        best_t = max(truncate, key=lambda v: v["img_s_per_gpu"])
        headline["best_truncate_variant"] = best_t["variant"]
        headline["best_truncate_img_s_per_gpu"] = best_t["img_s_per_gpu"]
    results["headline"] = headline
    targets = {}
    if truncate and results["env"]["device_type"] == "cuda":
        best_t = max(truncate, key=lambda v: v["img_s_per_gpu"])
        targets["img_s_per_gpu_truncate"] = dict(value=best_t["img_s_per_gpu"],
                                                 target_min=TARGETS["img_s_per_gpu_truncate"],
                                                 met=best_t["img_s_per_gpu"] >= TARGETS["img_s_per_gpu_truncate"])
        if best_t["mfu_pct"] is not None:
            targets["mfu_pct_truncate"] = dict(value=best_t["mfu_pct"], target_min=TARGETS["mfu_pct_truncate"],
                                               met=best_t["mfu_pct"] >= TARGETS["mfu_pct_truncate"])
        if best_t.get("speedup_vs_reference_baseline"):
            s = best_t["speedup_vs_reference_baseline"]
            targets["speedup_vs_reference_baseline"] = dict(value=s, target_min=TARGETS["speedup_vs_reference_baseline"],
                                                            met=s >= TARGETS["speedup_vs_reference_baseline"])
    results["targets"] = targets


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Train-step benchmark: {s['preset']} ({s['arch']}), batch {s['batch']} per GPU",
             "",
             provenance_line(results),
             "",
             f"{s['warmup']} warm-up + {s['steps']} timed steps, {results['data']}; img/s from the median step; "
             "FLOPs: model FLOPs (scalejepa.flops), MFU vs dense bf16 peak "
             f"({results['peak_tflops'] if results['peak_tflops'] else 'n/a'} TFLOP/s).",
             "",
             "| variant | img/s/GPU | step ms (p10-p90) | TFLOP/s | MFU % | GFLOP/img | ctx tok | peak GiB "
             "| GPU-h/epoch | GPU-h schedule | x ref. baseline | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for v in results["variants"]:
        if "error" in v:
            lines.append(f"| {v['variant']} | | | | | | | | | | | not measured: "
                         f"{v['error'].splitlines()[0][:160].replace('|', '/')} |")
            continue
        p = v["projection"]
        lines.append(
            f"| {v['variant']} | {v['img_s_per_gpu']:.1f} | {v['step_ms_median']:.1f} ({v['step_ms_p10']:.1f}-"
            f"{v['step_ms_p90']:.1f}) | {v['tflops_per_gpu']:.2f} | {f(v['mfu_pct'], '.1f')} | "
            f"{v['gflops_per_image']:.1f} | {v['context_tokens_per_image']:.1f} | "
            f"{f(v.get('peak_memory_allocated_gib'), '.1f')} | {p['gpu_hours_per_epoch']:.3g} | "
            f"{p['gpu_hours_schedule']:.4g} | {f(v.get('speedup_vs_reference_baseline'), '.2f')} | "
            f"{v.get('note', '')} |")
    h = results.get("headline", {})
    if h.get("best_variant"):
        lines += ["", f"Best: **{h['best_variant']}**, {h['img_s_per_gpu']:.1f} img/s per GPU"
                  + (f", MFU {h['mfu_pct']:.1f}%" if h.get("mfu_pct") is not None else "")
                  + f"; {h['gpu_hours_schedule']:.4g} GPU-hours for the preset's schedule (compute only) vs the "
                  f"paper's {flops.PAPER_A100_HOURS:.0f} A100-hours (16 A100s x 72 h, ViT-H/14, 300 epochs)."]
    if results.get("targets"):
        lines += ["", "Targets: " + "; ".join(f"{k} {t['value']:.3g} (goal {t.get('target_min')}): "
                                              f"{'met' if t['met'] else 'not met'}"
                                              for k, t in results["targets"].items())]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> str | None:
    plt, reason = pyplot()
    if plt is None:
        return reason
    measured = [v for v in results["variants"] if "img_s_per_gpu" in v]
    if not measured:
        return "no variant was measured"
    names = [v["variant"] for v in measured]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = ["tab:gray" if n.startswith("reference") else "tab:blue" for n in names]
    axes[0].bar(range(len(names)), [v["img_s_per_gpu"] for v in measured], color=colors)
    axes[0].set_ylabel("images/s per GPU")
    axes[0].set_title("throughput (median step)")
    second = [v["mfu_pct"] for v in measured]
    if all(x is not None for x in second):
        axes[1].bar(range(len(names)), second, color=colors)
        axes[1].set_ylabel("MFU % (dense bf16 peak)")
        axes[1].set_title("model FLOPs utilisation")
    else:
        axes[1].bar(range(len(names)), [v["tflops_per_gpu"] for v in measured], color=colors)
        axes[1].set_ylabel("TFLOP/s (model FLOPs)")
        axes[1].set_title("achieved TFLOP/s")
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    s, env = results["settings"], results["env"]
    save_figure(fig, path, f"{s['arch']} {s['preset']}, batch {s['batch']}: {env['device']}, {env['date']}",
                smoke=results["smoke"])
    return None


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
    p.add_argument("--variants", default="all", help="comma list of variant names, or 'all'")
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
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="each variant in its own process (default on a GPU)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--variant-timeout", type=int, default=1200, help="seconds per isolated variant")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="start no further variant after this many seconds (the first always runs); the rest "
                        "stay 'pending' for --resume-json")
    p.add_argument("--resume-json", type=Path, default=None, metavar="PATH|latest",
                   help="continue an unfinished run: measure its pending variants into the same JSON")
    p.add_argument("--retry-errors", action="store_true", help="with --resume-json: re-run variants that failed")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks the script")
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv_for_child = _child_argv(argv if argv is not None else sys.argv[1:])
    return args


def _child_argv(argv: list[str]) -> list[str]:
    """The parent's arguments minus those the parent sets per child."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--variants", "--child-out"):
            skip = True
            continue
        if a in ("--resume-json", "--time-budget"):
            skip = True
            continue
        if a.startswith(("--variants=", "--child-out=", "--resume-json=", "--time-budget=")) or \
                a in ("--isolate", "--no-isolate", "--retry-errors"):
            continue
        out.append(a)
    return out


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
        write_json(args.child_out, result)
        return args.child_out

    config = load_config(args.preset, args.override)
    env = environment(device)
    peak = args.peak_tflops if args.peak_tflops else flops.peak_tflops(device)
    stats = flops.mask_stats(config, args.batch)
    settings = {"preset": args.preset, "arch": config.model.arch, "image_size": config.model.image_size,
                "patch_size": config.model.patch_size, "batch": args.batch, "warmup": args.warmup,
                "steps": args.steps, "mask_pool": args.mask_pool, "seed": args.seed, "overrides": args.override, "isolate": args.isolate,
                "loader": args.loader}
    results = {
        "benchmark": "train_step", "env": env, "smoke": args.smoke, "settings": settings,
        "data": (f"real loader ({args.shards or 'scikit-image RGB photo shards of benchmarks/loader.py'}, "
                 f"{args.loader_workers} workers)"
                 if args.loader else f"synthetic images on the device, real masks: a pool of {args.mask_pool} mask "
                                     "batches the steps cycle through (data loading excluded)"),
        "peak_tflops": peak,
        "flop_convention": "model FLOPs (scalejepa.flops): matmuls, 2 per multiply-add, trained parts 3x forward, "
                           "target encoder forward only; no padding, recompute or elementwise work credited",
        "params": flops.param_counts(config),
        "expected_tokens_truncate": {"context_per_image": stats.context_tokens, "context_sampled": stats.context_sampled,
                                     "target_per_block": stats.target_tokens},
        "variants": [],
    }
    json_path = output_path(args.out_dir, "train_step", env, args.smoke)
    if args.resume_json is not None:
        json_path, results, names = resume(args, results, names)
    results["pending"] = [n for n in names if n not in {v["variant"] for v in results["variants"]}]
    progress(f"train_step: {args.preset} ({config.model.arch}), batch {args.batch}, {env['device']}, "
             f"variants {', '.join(results['pending'])}" + (" [isolated]" if args.isolate else ""))
    start, ran = time.perf_counter(), 0
    try:
        for name in list(results["pending"]):
            if ran and args.time_budget and time.perf_counter() - start > args.time_budget:
                progress(f"time budget of {args.time_budget} s spent: {', '.join(results['pending'])} left for "
                         f"--resume-json {json_path}")
                break
            if args.isolate:
                progress(f"variant {name}: child process")
                result = run_isolated(args, name, device)
                if "error" in result:
                    progress(f"  {name}: not measured ({result['error'].splitlines()[0][:200]})")
            else:
                result = run_one(args, name, device)
            results["variants"].append(result)
            results["pending"].remove(name)
            ran += 1
            save(results, json_path)  # after every variant: a killed run keeps what it measured
    finally:
        shutdown_distributed()
    save(results, json_path)
    progress(f"wrote {json_path} (+ .md" + ("" if results.get("chart_skipped") else ", .png") + ")")
    print(markdown(results))
    return json_path


def save(results: dict, json_path: Path) -> None:
    compare(results)
    write_report(json_path, results, markdown=markdown, plot=plot)


def resume(args, fresh: dict, names: list[str]) -> tuple[Path, dict, list[str]]:
    """Continue a run (``--resume-json PATH``, or ``latest``: the newest result in --out-dir
    with pending variants): same settings and device required; measured variants are kept."""
    import json

    path = args.resume_json
    if str(path) == "latest":
        candidates = sorted(args.out_dir.glob(f"train_step_{'smoke_' if args.smoke else ''}2*.json"))
        candidates = [p for p in candidates if json.loads(p.read_text()).get("pending")]
        if not candidates:
            progress(f"--resume-json latest: no unfinished run in {args.out_dir}; starting a new one")
            return output_path(args.out_dir, "train_step", fresh["env"], args.smoke), fresh, names
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


if __name__ == "__main__":
    main()
