"""What actually ran, read from ``torch.profiler``: the attention backend of a step (which
SDPA kernel PyTorch dispatched to, or ours), the device time of a number of calls, and the
time of each phase of a training step.

A benchmark that names a backend it asked for can still time another one (SDPA falls
back, or picks cuDNN by itself); the profiled operator and kernel names say which one ran.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Operators (as the profiler names them) that identify an attention backend.
ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_flash_attention_forward": "flash",  # torch.nn.attention.varlen, nested jagged SDPA
    "aten::_efficient_attention_forward": "efficient",
    "aten::_cudnn_attention_forward": "cudnn",
    "scalejepa::varlen_attn_fwd": "triton (scalejepa)",
    "FlexAttentionAutogradOp": "flex",  # eager FlexAttention (compiled: its kernels' names)
}
# Device kernels whose names contain one of these are attention kernels of some library.
KERNEL_WORDS = ("flash", "fmha", "attn", "attention", "cudnn", "sdpa", "mha", "varlen", "flex")
MAX_NAMES = 24


def profiled(fn: Callable[[], object], device: torch.device, calls: int = 1) -> profile:
    """The profile of ``calls`` calls of ``fn`` (device activity included on a GPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def attention_ran(prof: profile) -> dict:
    """Backends (from the operators that ran), the attention operators and device kernels."""
    ops, kernels = set(), set()
    for event in prof.events():
        name = event.name
        if event.device_type == DeviceType.CUDA:
            if any(word in name.lower() for word in KERNEL_WORDS):
                kernels.add(name[:200])
        elif name in ATTENTION_OPS:
            ops.add(name)
    backends = {ATTENTION_OPS[op] for op in ops} | {"flex" for k in kernels if "flex" in k.lower()}
    backends = sorted(backends)
    return {"backends": backends, "ops": sorted(ops), "kernels": sorted(kernels)[:MAX_NAMES],
            "kernels_total": len(kernels)}


def device_ms(prof: profile, device: torch.device, calls: int) -> dict:
    """Time per call from the profile: the device kernels' summed time on a GPU (launch
    gaps excluded), the operators' summed self time on a CPU."""
    averages = prof.key_averages()
    if device.type == "cuda":
        total_us = sum(a.self_device_time_total for a in averages)
        source = "sum of device kernel time"
    else:
        total_us = sum(a.self_cpu_time_total for a in averages)
        source = "sum of CPU operator self time"
    return {"ms_per_call": total_us / 1e3 / max(calls, 1), "source": source, "calls": calls}


def phases_ms(prof: profile, device: torch.device) -> dict[str, float]:
    """Time of each phase of one profiled training step, by the ``record_function`` labels
    of ``scalejepa.step`` and the engines (``scalejepa/backward`` -> ``backward``): the device
    time of the kernels launched inside each on a GPU, the CPU time on a CPU."""
    from scalejepa.step import PHASES

    out = {}
    for average in prof.key_averages():
        if average.key in PHASES:
            total_us = average.device_time_total if device.type == "cuda" else average.cpu_time_total
            out[average.key.split("/", 1)[1]] = total_us / 1e3
    return out
