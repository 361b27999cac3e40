"""Price a traced step on a cluster: each op on a roofline, each collective on its link, and
a schedule of the compute stream and the communication stream that overlaps only what
FSDP2 overlaps.

* An op takes ``max(FLOPs / matmul rate of its dtype, bytes / memory rate, KERNEL_FLOOR_S)``
  at the GPU's *achievable* rates (:mod:`scalejepa.plan.hardware`), divided by the phase's
  efficiency (1.0 until ``--calibrate`` fits one from a measured step). Attention backward kernels recompute Q K^T: 1.25x their model FLOPs.
* A collective over n ranks moves ``(n - 1) / n`` of its buffer per GPU (ring all-gather and
  reduce-scatter; twice that for an all-reduce) at the intra-node rate when its group sits in
  one node, else at the per-GPU network rate, plus a latency per collective.
* The schedule replays the trace in program order. FSDP2 issues a unit's all-gather in its
  pre-forward (or as the backward prefetch of the next unit) and makes the compute stream
  wait for it at ``all_gather_copy_out``; it keeps one all-gather in flight ahead of compute,
  so an all-gather starts when the link is free and the previous one has been copied out:
  the next block's gather runs under this block's compute, the step's first gather is
  exposed. Reduce-scatters (and HSDP's all-reduce across replicas) start after the unit's
  backward; the optimizer waits for all of them, so the last one is exposed. The CPU is
  assumed to stay ahead of the GPU (launch overhead is not priced).
* Micro-batches beyond the two traced ones repeat the second one's events.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from scalejepa.plan.hardware import Cluster
from scalejepa.plan.trace import PHASES, UPDATE_LABEL, Collective, Label, Op, StepTrace
from scalejepa.step import PHASE_DATA

KERNEL_FLOOR_S = 2e-6  # shortest kernel incl. the gap to the next (assumed; typical for H100/A100 eager)
LATENCY_INTRA_S = 10e-6  # per collective within a node (assumed; NCCL small-message latency)
LATENCY_INTER_S = 20e-6  # per collective across nodes (assumed)
ATTENTION_BACKWARD_RECOMPUTE = 1.25
_UNIT = re.compile(r"^FSDP::(all_gather|all_gather_copy_out)(?: \((?P<unit>.*)\))?$")


@dataclass
class StepTime:
    step_s: float
    phases_s: dict[str, float]  # compute per phase (no waiting)
    comm_total_s: float
    comm_exposed_s: float  # time the compute stream waited for collectives
    exposed_by_phase: dict[str, float] = field(default_factory=dict)
    comm_bytes: dict[str, float] = field(default_factory=dict)  # per GPU moved, by link

    def to_dict(self) -> dict:
        return {"step_time_s": self.step_s, "phases_s": self.phases_s, "comm_total_s": self.comm_total_s,
                "comm_exposed_s": self.comm_exposed_s, "comm_exposed_by_phase_s": self.exposed_by_phase,
                "comm_bytes_per_gpu": self.comm_bytes}


def op_seconds(op: Op, rates: dict[str, float], efficiency: float = 1.0) -> float:
    flops = op.flops * (ATTENTION_BACKWARD_RECOMPUTE if op.attention_backward else 1.0)
    matmul = rates["bf16_flops"] if op.dtype in ("torch.bfloat16", "torch.float16") else rates["fp32_flops"]
    seconds = max(flops / matmul if flops else 0.0, op.bytes / rates["hbm_bytes"], KERNEL_FLOOR_S)
    return seconds / efficiency


def collective_seconds(c: Collective, cluster: Cluster, rates: dict[str, float]) -> tuple[float, str, float]:
    """(seconds, link, bytes moved per GPU) of one collective."""
    n = len(c.ranks)
    if n <= 1:
        return 0.0, "none", 0.0
    moved = c.bytes * (n - 1) / n * (2 if c.kind == "all_reduce" else 1)
    nodes = {r // cluster.per_node for r in c.ranks}
    if len(nodes) > 1:
        return LATENCY_INTER_S + moved / rates["inter_node_bytes"], "inter_node", moved
    return LATENCY_INTRA_S + moved / rates["intra_node_bytes"], "intra_node", moved


def expand_micro_batches(trace: StepTrace) -> list:
    """The events of the whole step: micro-batches beyond the traced ones repeat the last
    traced one (it starts with gradients present, as every later one does)."""
    events = trace.events
    if trace.grad_accum <= trace.micro_batches_traced:
        return events
    starts = [i for i, e in enumerate(events) if isinstance(e, Label) and e.name == PHASE_DATA]
    update = next(i for i, e in enumerate(events) if isinstance(e, Label) and e.name == UPDATE_LABEL)
    last = events[starts[-1]:update]
    return events[:update] + last * (trace.grad_accum - trace.micro_batches_traced) + events[update:]


def schedule(trace: StepTrace, cluster: Cluster, efficiency: dict[str, float] | None = None) -> StepTime:
    """Replay the trace on ``cluster`` (see the module docstring)."""
    rates = cluster.rates()
    efficiency = efficiency or {}
    compute = 0.0  # the compute stream's clock at the current point of the program
    link_free = 0.0  # when the communication stream is next free
    last_copy_out = 0.0  # compute clock when the previous all-gather was consumed
    gathers: dict[str, list[float]] = defaultdict(list)  # unit -> end times of its in-flight all-gathers
    phases = dict.fromkeys(PHASES, 0.0)
    exposed = dict.fromkeys(PHASES, 0.0)
    moved: dict[str, float] = defaultdict(float)
    comm_total = 0.0
    phase = "target_forward"

    def wait_until(t: float) -> None:
        nonlocal compute
        if t > compute:
            exposed[phase] = exposed.get(phase, 0.0) + t - compute
            compute = t

    for event in expand_micro_batches(trace):
        if event.phase == "optimizer" and phase != "optimizer":
            phase = "optimizer"
            wait_until(link_free)  # the optimizer needs every reduced gradient
        phase = event.phase if event.phase in phases else phase
        if isinstance(event, Op):
            seconds = op_seconds(event, rates, efficiency.get(phase, 1.0))
            compute += seconds
            phases[phase] += seconds
        elif isinstance(event, Collective):
            seconds, link, nbytes = collective_seconds(event, cluster, rates)
            comm_total += seconds
            moved[link] += nbytes
            match = _UNIT.match(event.label)
            if event.kind == "all_gather" and match:
                start = max(link_free, last_copy_out)
                link_free = start + seconds
                gathers[match["unit"] or ""].append(link_free)
            elif event.label:  # FSDP2's reduce-scatter / HSDP all-reduce after a unit's backward
                link_free = max(link_free, compute) + seconds
            else:  # a collective the step waits for (the loss all-reduce)
                link_free = max(link_free, compute) + seconds
                wait_until(link_free)
        elif isinstance(event, Label):
            match = _UNIT.match(event.name)
            if match and match.group(1) == "all_gather_copy_out":
                pending = gathers.get(match["unit"] or "")
                if pending:
                    wait_until(pending.pop(0))
                last_copy_out = compute
    wait_until(link_free)  # nothing of the step may still be in flight at its end
    return StepTime(step_s=compute, phases_s=phases, comm_total_s=comm_total,
                    comm_exposed_s=sum(exposed.values()), exposed_by_phase=exposed, comm_bytes=dict(moved))
