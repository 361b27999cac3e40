"""What a run of a preset would cost on a cluster: memory per GPU and its verdict, step time
by phase, throughput, MFU and GPU-hours, the largest micro-batch that fits, and a backend
recommendation. Every figure is a prediction (``"predicted": true``) until ``--calibrate``
fits it to a measured step.

FSDP2 and one-device runs are traced (:mod:`scalejepa.plan.trace`) and scheduled
(:mod:`scalejepa.plan.timeline`). DeepSpeed cannot run on fake tensors: its model states
come from DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``), its activations and compute from the traced
one-device step at the same micro-batch, and its collectives from their volumes (labelled
``"analytic"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from scalejepa import flops
from scalejepa.config import Config, ConfigError
from scalejepa.plan.hardware import Cluster
from scalejepa.plan.timeline import StepTime, schedule
from scalejepa.plan.trace import GIB, StepTrace, check_plannable, planning_config, trace_step

# Images per second one CPU core decodes and crops for training: the loader benchmark's
# one-worker pipeline (benchmarks/results/loader_20261123T183351Z.json: 446 img/s per core,
# JPEG photos of ~0.34 MP at 224 px, a 2-core VM). ImageNet's photos are ~0.11-0.2 MP,
# so this is a conservative rate for them.
LOADER_IMG_S_PER_CORE = 446.0
LOADER_SOURCE = "benchmarks/results/loader_20261123T183351Z.json (pipeline, 1 worker)"


def _with(config: Config, **sections) -> Config:
    """A copy of ``config`` with ``section={field: value}`` changes."""
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **changes)
                                          for name, changes in sections.items()})


@dataclasses.dataclass
class Priced:
    """One configuration on one cluster: its memory and its step time."""

    label: str
    config: Config
    memory: dict[str, float]  # GiB by category + peak, on the largest mask draws
    step: StepTime
    micro_batch: int
    grad_accum: int
    analytic: bool = False  # True when part of it is not traced (DeepSpeed)
    trace: StepTrace | None = None  # the typical step (time)
    peak_trace: StepTrace | None = None  # the step with the largest mask draws (memory)
    traced_as: dict[str, str] = dataclasses.field(default_factory=dict)  # stand-ins the trace used


def price(config: Config, cluster: Cluster, *, efficiency: dict[str, float] | None = None,
          label: str = "", progress: Callable[[str], None] | None = None) -> Priced:
    """Trace ``config`` on ``cluster``'s world size and schedule it on its GPUs (DeepSpeed:
    see the module docstring); ``efficiency``: per-phase factors from ``--calibrate``."""
    requested, config = config, planning_config(config)
    check_plannable(config, cluster.world_size)
    if progress:
        progress(f"tracing {label or config.distributed.backend} on {cluster.world_size} ranks ...")
    if config.distributed.backend == "deepspeed":
        return _price_deepspeed(config, cluster, efficiency, label)
    trace = trace_step(config, cluster.world_size)  # a typical step: its time
    peak = trace_step(config, cluster.world_size, masks="largest", record_ops=False)  # the run's peak memory
    return Priced(label or config.distributed.backend, config, peak.memory_gib(), schedule(trace, cluster, efficiency),
                  trace.micro_batch, trace.grad_accum, trace=trace, peak_trace=peak,
                  traced_as=_stand_ins(requested, config))


def step_seconds(config: Config, cluster: Cluster) -> float:
    """The predicted time of one typical optimizer step of ``config`` on ``cluster`` (no
    memory verdict: ``scalejepa-sweep plan`` prices many shapes with it)."""
    config = planning_config(config)
    check_plannable(config, cluster.world_size)
    return schedule(trace_step(config, cluster.world_size), cluster).step_s


def _stand_ins(requested: Config, traced: Config) -> dict[str, str]:
    """What the trace ran in place of what the config asks for (see ``planning_config``)."""
    pairs = {"model.attn_impl": (requested.model.attn_impl, traced.model.attn_impl),
             "model.sdpa_backend": (requested.model.sdpa_backend, traced.model.sdpa_backend),
             "distributed.compile": (requested.distributed.compile, traced.distributed.compile)}
    return {key: f"{a} traced as {b}" for key, (a, b) in pairs.items() if a != b}


# ----------------------------------------------------------------------------- DeepSpeed


def _price_deepspeed(config: Config, cluster: Cluster, efficiency, label: str) -> Priced:
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError as exc:
        raise ConfigError(f"distributed.backend=deepspeed needs DeepSpeed to be priced ({exc}): "
                          "pip install 'scalejepa[deepspeed]'") from None
    world = cluster.world_size
    stage = config.distributed.zero_stage
    accum = config.train.grad_accum
    micro = config.train.batch_size // world // accum
    # The replica's compute and activations: the one-device step at the same micro-batch.
    replica = _with(config, distributed={"backend": "none"}, train={"batch_size": micro * accum})
    step = schedule(trace_step(replica, 1), cluster, efficiency)
    local = trace_step(replica, 1, masks="largest", record_ops=False)
    params = flops.param_counts(config)
    trained, target = params["trainable"], params["target"]
    per_node, nodes = cluster.per_node, cluster.nodes
    if stage == 3:
        layer = _largest_layer_params(config)
        _, states, _ = estimate_zero3_model_states_mem_needs(trained, layer, per_node, nodes, cpu_offload=False,
                                                             cpu_offload_params=False, zero_init=True)
        target_bytes = 4 * target / world + 4 * layer  # its own forward-only ZeRO-3 engine, fp32
    else:
        _, states = estimate_zero2_model_states_mem_needs(trained, per_node, nodes, cpu_offload=False)
        if stage == 1:  # gradients are not partitioned: full 16-bit gradients on every rank
            states += int(2 * trained * (world - 1) / world)
        target_bytes = 4 * target  # a plain fp32 replica
    memory = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "model_states": states / GIB,
              "target_encoder": target_bytes / GIB, "activations": local.memory["activations"] / GIB,
              "other": local.memory["other"] / GIB}
    memory["peak"] = memory["model_states"] + memory["target_encoder"] + memory["activations"] + memory["other"]
    step = _deepspeed_comm(step, config, cluster, trained)
    return Priced(label or f"deepspeed zero{stage}", config, memory, step, micro, accum, analytic=True)


def _largest_layer_params(config: Config) -> int:
    from scalejepa.models.vit import model_size

    size = model_size(config.model)
    return 3 * size.embed_dim * size.embed_dim + size.embed_dim * size.mlp_hidden_dim


def _deepspeed_comm(step: StepTime, config: Config, cluster: Cluster, trained: int) -> StepTime:
    """ZeRO's collectives from their volumes: stages 1-2 reduce-scatter the gradients
    (overlapped with the backward) and all-gather the updated 16-bit weights after the
    optimizer (exposed); stage 3 gathers the weights in forward and backward as FSDP does,
    overlapped with compute except the first gather and the last reduce-scatter."""
    world = cluster.world_size
    if world == 1:
        return step
    rates = cluster.rates()
    link = rates["inter_node_bytes"] if world > cluster.per_node else rates["intra_node_bytes"]
    ring = (world - 1) / world
    reduce_bytes = 2 if config.distributed.reduce_dtype == "bf16" else 4
    accum = config.train.grad_accum
    reduce = accum * trained * reduce_bytes * ring / link
    gather = trained * 2 * ring / link
    compute = sum(step.phases_s.values())
    if config.distributed.zero_stage == 3:
        total = reduce + gather * (2 * accum)
        exposed = max(0.0, total - compute) + (gather + reduce / accum) / _depth(config)
    else:
        total = reduce + gather
        exposed = max(0.0, reduce - step.phases_s["backward"]) + gather
    return dataclasses.replace(step, step_s=step.step_s + exposed, comm_total_s=total, comm_exposed_s=exposed,
                               comm_bytes={"analytic": (reduce + gather) * link})


def _depth(config: Config) -> int:
    from scalejepa.models.vit import model_size

    return model_size(config.model).depth + config.model.pred_depth


# ----------------------------------------------------------------------------- max batch


def max_micro_batch(config: Config, cluster: Cluster, first: StepTrace | None = None,
                    progress: Callable[[str], None] | None = None, max_traces: int = 8) -> dict:
    """The largest micro-batch per GPU whose traced peak fits the usable memory, and the
    grad-accumulation that keeps the preset's global batch. Peak memory is nearly affine in
    the micro-batch, so the search brackets the answer between a traced micro-batch that
    fits and one that does not, and traces where the line through the nearest two points
    crosses the usable memory (a secant search; a handful of traces). Every trace runs the
    largest of its mask draws: the step that would run out of memory first."""
    config = planning_config(config)
    world, usable = cluster.world_size, cluster.usable_gib()
    cap = config.train.batch_size // world  # no GPU needs more than its share of the global batch
    peaks: dict[int, float] = {}

    def trace(batch: int) -> None:
        if progress:
            progress(f"max-batch: tracing micro-batch {batch} ...")
        probe = _with(config, train={"batch_size": batch * world, "grad_accum": 1})
        peaks[batch] = trace_step(probe, world, record_ops=False, masks="largest").peak_bytes / GIB

    b0 = max(1, cap // config.train.grad_accum)
    if first is not None and first.grad_accum == 1:
        peaks[b0] = first.peak_bytes / GIB
    else:
        trace(b0)
    trace(b0 // 2 if b0 >= 2 else 2)
    for _ in range(max_traces):
        lo = max((b for b, p in peaks.items() if p <= usable), default=0)
        hi = min((b for b, p in peaks.items() if p > usable), default=cap + 1)
        if hi - lo <= 1:
            break
        (b_a, p_a), (b_b, p_b) = sorted(peaks.items(), key=lambda bp: abs(bp[1] - usable))[:2]
        slope = (p_b - p_a) / (b_b - b_a)
        guess = math.floor(b_a + (usable - p_a) / slope) if slope > 0 else hi - 1
        trace(min(max(guess, lo + 1), hi - 1))
    best = max((b for b, p in peaks.items() if p <= usable), default=0)
    (b_a, p_a), (b_b, p_b) = sorted(peaks.items())[:2]
    slope = (p_b - p_a) / (b_b - b_a)
    global_batch = config.train.batch_size
    accum = next((a for a in range(1, global_batch + 1)
                  if global_batch % (world * a) == 0 and global_batch // (world * a) <= best), None) if best else None
    return {"max_batch_per_gpu": best, "max_batch_capped": best == cap, "usable_gib": usable,
            "traced_peaks_gib": dict(sorted(peaks.items())),
            "fit": {"fixed_gib": p_a - slope * b_a, "gib_per_image": slope},
            "global_batch": global_batch,
            "grad_accum_for_global_batch": accum,
            "micro_batch_for_global_batch": global_batch // (world * accum) if accum else None}


# ----------------------------------------------------------------------------- report


def report(priced: Priced, cluster: Cluster) -> dict:
    """The planner's JSON object for one priced configuration (``scalejepa-plan --json``)."""
    config, step = priced.config, priced.step
    world = cluster.world_size
    per_gpu_batch = priced.micro_batch * priced.grad_accum
    img_s = per_gpu_batch / step.step_s
    flops_per_image = flops.expected_flops_per_image(config, priced.micro_batch)
    peak_tflops = cluster.gpu.bf16_tflops if config.train.precision == "bf16" else cluster.gpu.fp32_tflops
    images_per_epoch = config.data.num_samples or flops.PAPER_IMAGES_PER_EPOCH  # unset: ImageNet-1k's, said below
    epochs = config.train.epochs if not config.train.steps else config.train.steps * config.train.batch_size / images_per_epoch
    gpu_hours_epoch = images_per_epoch / img_s / 3600
    loader_cores = img_s / LOADER_IMG_S_PER_CORE
    phases = {**step.phases_s, "data_wait": 0.0}
    return {
        "predicted": True,
        "label": priced.label,
        "analytic_parts": priced.analytic,
        "traced_as": priced.traced_as,
        "gpu": cluster.gpu.kind,
        "cluster": cluster.to_dict(),
        "world_size": world,
        "backend": config.distributed.backend,
        "shard_group_size": config.distributed.shard_group_size,
        "zero_stage": config.distributed.zero_stage if config.distributed.backend == "deepspeed" else None,
        "activation_checkpointing": config.distributed.activation_checkpointing,
        "precision": config.train.precision,
        "attn_impl": config.model.attn_impl,
        "mask_context": config.mask.context,
        "micro_batch_per_gpu": priced.micro_batch,
        "grad_accum": priced.grad_accum,
        "global_batch": config.train.batch_size,
        "memory_gib": priced.memory,
        # what is alive at the moment of the peak (the categories above are each one's most)
        "memory_at_peak_gib": ({k: v / GIB for k, v in priced.peak_trace.memory_at_peak.items()}
                               if priced.peak_trace else None),
        "usable_gib": cluster.usable_gib(),
        "fits": priced.memory["peak"] <= cluster.usable_gib(),
        **step.to_dict(),
        "phases_s": phases,
        "img_s_per_gpu": img_s,
        "model_gflops_per_image": flops_per_image / 1e9,
        "mfu": flops.mfu_pct(flops_per_image, img_s, peak_tflops) / 100,
        "gpu_hours_per_epoch": gpu_hours_epoch,
        "epochs": epochs,
        "images_per_epoch": images_per_epoch,
        "images_per_epoch_source": "data.num_samples" if config.data.num_samples else
        "data.num_samples unset: ImageNet-1k's 1,281,167 assumed",
        "gpu_hours_total": gpu_hours_epoch * epochs,
        "wall_hours": gpu_hours_epoch * epochs / world,
        "loader_cores_per_gpu": loader_cores,
        "loader_rate": {"img_s_per_core": LOADER_IMG_S_PER_CORE, "source": LOADER_SOURCE},
        "paper_budget": {"what": "ViT-H/14, 300 epochs of ImageNet-1k on 16 A100s in under 72 hours",
                         "a100_hours": flops.PAPER_A100_HOURS, "gpus": flops.PAPER_GPUS, "hours": flops.PAPER_HOURS},
    }


# ----------------------------------------------------------------------------- recommendation


def candidates(config: Config, cluster: Cluster) -> list[tuple[str, Config]]:
    """Layouts worth comparing on this cluster, each with and without activation
    checkpointing: one device; FSDP2 over all GPUs; HSDP sharded within one node, or two
    nodes when there are four or more; DeepSpeed ZeRO-2 and ZeRO-3 where DeepSpeed is
    installed."""
    base = []
    if cluster.world_size == 1:
        base.append(("none", _with(config, distributed={"backend": "none", "shard_group_size": 0})))
    base.append(("fsdp2", _with(config, distributed={"backend": "fsdp2", "shard_group_size": 0})))
    groups = [cluster.per_node] * (cluster.nodes > 1) + [2 * cluster.per_node] * (cluster.nodes >= 4)
    for group in groups:
        base.append((f"fsdp2 hsdp shard {group}",
                     _with(config, distributed={"backend": "fsdp2", "shard_group_size": group})))
    if cluster.world_size > 1 and _has_deepspeed():
        for stage in (2, 3):
            base.append((f"deepspeed zero{stage}", _with(config, distributed={"backend": "deepspeed",
                                                                              "zero_stage": stage})))
    out = []
    for label, cand in base:
        out.append((label, _with(cand, distributed={"activation_checkpointing": False})))
        out.append((label + " + AC", _with(cand, distributed={"activation_checkpointing": True})))
    return out


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def recommend(requested: Priced, cluster: Cluster, efficiency=None, progress=None) -> list[dict]:
    """Every candidate priced (the requested configuration is not traced twice); the
    fastest that fits first, each with its reason."""
    rows = []
    for label, cand in candidates(requested.config, cluster):
        if planning_config(cand) == requested.config:
            priced = dataclasses.replace(requested, label=label)
        else:
            priced = price(cand, cluster, efficiency=efficiency, label=label, progress=progress)
        r = report(priced, cluster)
        rows.append({"label": label, "fits": r["fits"], "peak_gib": r["memory_gib"]["peak"],
                     "step_time_s": r["step_time_s"], "comm_exposed_s": r["comm_exposed_s"],
                     "img_s_per_gpu": r["img_s_per_gpu"], "analytic_parts": r["analytic_parts"]})
    fitting = [r for r in rows if r["fits"]]
    best = min(fitting, key=lambda r: r["step_time_s"]) if fitting else min(rows, key=lambda r: r["peak_gib"])
    for r in rows:
        r["reason"] = _reason(r, best, cluster)
    return sorted(rows, key=lambda r: (r is not best, not r["fits"], r["step_time_s"]))


def _reason(row: dict, best: dict, cluster: Cluster) -> str:
    if not row["fits"]:
        return f"does not fit: peak {row['peak_gib']:.1f} GiB > {cluster.usable_gib():.1f} GiB usable"
    if row is best:
        return (f"fastest that fits: {row['step_time_s'] * 1e3:.0f} ms/step, {row['peak_gib']:.1f} GiB peak, "
                f"{row['comm_exposed_s'] * 1e3:.0f} ms of exposed communication")
    slower = row["step_time_s"] / best["step_time_s"] - 1
    why = "recomputes activations" if "AC" in row["label"] and "AC" not in best["label"] else (
        "more exposed communication" if row["comm_exposed_s"] > best["comm_exposed_s"] else "more compute")
    return f"fits, {100 * slower:.0f}% slower than {best['label']} ({why})"
