"""Attention at I-JEPA shapes: our Triton varlen kernel vs what PyTorch offers at the same
packed shapes (torch.nn.attention.varlen, SDPA on nested jagged tensors, cuDNN SDPA,
FlexAttention) and vs SDPA padded / truncated.

Methods, each on the same per-sequence lengths:
- ``triton_varlen``: ``scalejepa.kernels.varlen_attention`` on the packed sequences (no padding).
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's varlen kernel;
  CUDA, torch >= 2.10), packed.
- ``sdpa_nested_flash`` / ``sdpa_nested_cudnn``: SDPA on nested jagged tensors made from the
  packed tensors, the backend pinned to flash / cuDNN.
- ``sdpa_padded``: ``F.scaled_dot_product_attention`` on the sequences padded to the batch
  maximum, with a boolean key-padding mask, backend as PyTorch dispatches (what a padded model
  runs); ``sdpa_padded_cudnn`` the same pinned to cuDNN (``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1``
  is set for it). The tensors are padded before timing: pad/unpad copies are not counted, which
  favours SDPA.
- ``sdpa_truncated``: SDPA on every sequence truncated to the batch minimum, no mask (what the
  reference I-JEPA computes; it also drops tokens, so it does less work).
- ``flex_document``: FlexAttention (compiled on CUDA) over the packed sequence with a document
  mask, block mask built before timing.
The packed methods run the model's own code (``scalejepa.models.layers.attention.attend``).
A method that cannot run here (no kernel for the device, an old torch) is recorded with its
error. Every method also records what ran (``ran``: the backends, operators and device kernels
of one profiled call, ``_profile.py``): a pinned backend that fell back, or an unpinned one
that picked cuDNN, shows there.

Also times the fused gathers (``gather_tokens``, ``build_predictor_input``) against their
plain-PyTorch references at ViT-H/14 shapes (``gathers`` in the JSON), to tell whether they pay.

Cases (``--batch`` images, default 128 per GPU as in the ViT-H/14 config):
- ``vith_context``: ViT-H/14 context encoder, 16 heads x 80, per-image context lengths from
  ``scalejepa.masks`` (16x16 grid, reference masks, ``context="pack"``: every sampled context
  token kept, ~36-154, mean ~110); if that module cannot be imported, a synthetic stand-in:
  ``36 + 118 * Beta(2.5, 1.5)`` (mean ~110). The JSON records which source was used.
- ``vith_predictor``: 4 blocks x batch sequences of [context ; ~44 targets], 16 heads x 24.
- ``vitg_context``: ViT-G/16 context (14x14 grid), 16 heads x 88.
- ``long``: 4 sequences of 4096 tokens, 16 heads x 128 (forward TFLOP/s is the figure of merit).

FLOPs (stated convention, FlashAttention's): forward = 4 * sum_i(L_i^2) * head_dim * heads
(Q K^T and P V, 2 FLOPs per multiply-add); backward = 2.5 x forward; fwd+bwd = 3.5 x forward.
Every method is credited with the useful FLOPs of the lengths it attends over (the packed
lengths, or the truncated ones for ``sdpa_truncated``), not with the padding it computes.

Timing: at I-JEPA shapes one call is tens of microseconds of kernel, less than the host's
launch overhead, so one call after a sync would time Python. Each of ``--repeats`` samples
is ``--calls`` back-to-back calls between two CUDA events (divided by ``--calls``), after
``--warmup`` calls; the median is reported (``fwd_ms``...). The profiler's device time of
``--calls`` calls is reported beside it (``fwd_kernel_ms``...: kernels only, launch gaps
excluded). Backward is timed as ``torch.autograd.grad`` of a retained graph.

The rule for the library paths: where one is measured on the GPU within 3% of
``triton_varlen``'s fwd+bwd time at both ViT-H packed cases (``vith_context``,
``vith_predictor``), it should replace our kernel as the model's packed attention
(``model.attn_impl``/``model.sdpa_backend``, the setting it names in
``library_within_3pct``), with ``attn_impl=triton`` kept as an option, once
``benchmarks/train_step.py`` confirms the step's img/s. No GPU has measured it yet: the
default stays as it is.

Writes ``attention_<timestamp>.json`` (device, versions, UTC time, git commit, every raw time)
after every case (a killed run keeps the cases it finished) and a PNG bar chart at the end
to ``--out-dir``. ``--smoke`` runs tiny shapes on CPU (Triton interpreter) in seconds, to
check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO, benchmark_device, ensure_importable, environment, output_path, pyplot, save_figure, write_json, write_report,
)
from _profile import attention_ran, device_ms, profiled  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("triton_varlen", "torch_varlen", "sdpa_nested_flash", "sdpa_nested_cudnn", "sdpa_padded",
           "sdpa_padded_cudnn", "sdpa_truncated", "flex_document")
# The library paths that compute the packed attention triton_varlen does, and the setting
# that selects each in the model (the 3% rule of the module docstring).
LIBRARY_PATHS = {
    "torch_varlen": "model.attn_impl=torch_varlen",
    "sdpa_nested_flash": "model.attn_impl=sdpa_nested model.sdpa_backend=flash",
    "sdpa_nested_cudnn": "model.attn_impl=sdpa_nested model.sdpa_backend=cudnn",
    "sdpa_padded": "model.attn_impl=sdpa",
    "sdpa_padded_cudnn": "model.attn_impl=sdpa model.sdpa_backend=cudnn",
    "flex_document": "model.attn_impl=flex",
}
LIBRARY_MARGIN = 1.03  # within 3% of triton_varlen's fwd+bwd time
TARGETS = {"vith_context_fwdbwd_vs_sdpa_padded": 0.8, "long_fwd_tflops": 450.0}


# ----------------------------------------------------------------------------- shapes
def mask_lengths(grid: int, batch: int, seed: int) -> tuple[list[int], list[int], str]:
    """Per-image context lengths and per-block target lengths (s = m * B + b) of one batch."""
    try:
        from scalejepa.config import MaskConfig
        from scalejepa.masks import MaskGenerator, mask_rng
    except ImportError as e:  # the stand-in below is recorded in the JSON, not silent
        print(f"note: scalejepa.masks unavailable ({e}); using synthetic lengths", file=sys.stderr)
    else:
        masks = MaskGenerator(grid, MaskConfig(context="pack"))(batch, mask_rng(seed, 0, 0, 0))
        ctx = torch.diff(masks.context.seqs.cu_seqlens).tolist()
        tgt = torch.diff(masks.target_seqs.cu_seqlens).tolist()
        return ctx, tgt, f"scalejepa.masks (grid {grid}, reference mode, context=pack, seed {seed})"
    rng = np.random.default_rng(seed)
    scale = (grid * grid) / 256
    ctx = np.round((36 + 118 * rng.beta(2.5, 1.5, batch)) * scale).astype(int).tolist()
    tgt = np.round(rng.integers(35, 55, 4 * batch) * scale).astype(int).tolist()
    return ctx, tgt, "synthetic: 36 + 118 * Beta(2.5, 1.5) context, U[35, 54] targets (scaled to the grid)"


def make_cases(args) -> list[dict]:
    if args.smoke:  # tiny shapes for the interpreter; same case names
        return [
            dict(name="vith_context", lengths=[5, 9, 3], heads=1, head_dim=80, source="smoke"),
            dict(name="vith_predictor", lengths=[7, 4, 11, 6], heads=1, head_dim=24, source="smoke"),
            dict(name="long", lengths=[40], heads=1, head_dim=16, source="smoke"),
        ]
    ctx_h, tgt_h, src_h = mask_lengths(16, args.batch, args.seed)
    ctx_g, _, src_g = mask_lengths(14, args.batch, args.seed)
    pred = [ctx_h[s % args.batch] + n for s, n in enumerate(tgt_h)]
    return [
        dict(name="vith_context", lengths=ctx_h, heads=16, head_dim=80, source=src_h),
        dict(name="vith_predictor", lengths=pred, heads=16, head_dim=24, source=src_h),
        dict(name="vitg_context", lengths=ctx_g, heads=16, head_dim=88, source=src_g),
        dict(name="long", lengths=[4096] * 4, heads=16, head_dim=128, source="fixed"),
    ]


def attention_flops(lengths, heads: int, head_dim: int) -> float:
    return 4.0 * sum(n * n for n in lengths) * head_dim * heads


# ----------------------------------------------------------------------------- timing
def time_ms(fn, warmup: int, repeats: int, calls: int, device: torch.device) -> list[float]:
    """Milliseconds per call, one sample per repeat: ``calls`` back-to-back calls between two
    CUDA events (two clock reads on a CPU), divided by ``calls``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return times


def measure(forward, inputs, args, device, fwd_only: bool = False) -> dict:
    """Raw fwd, bwd and fwd+bwd times (ms per call) of ``forward(*inputs)`` (only fwd if
    ``fwd_only``), the profiler's device time of each pass, and what ran; a pass that raises
    is recorded."""
    result = {}
    detached = [t.detach() for t in inputs]  # forward alone: no autograd bookkeeping

    def fwd():
        with torch.no_grad():
            return forward(*detached)

    def timed(name, fn):
        result[name] = time_ms(fn, args.warmup, args.repeats, args.calls, device)
        prof = profiled(fn, device, args.calls)
        result[f"{name}_kernel"] = device_ms(prof, device, args.calls)
        result["ran"] = attention_ran(prof)

    try:
        timed("fwd", fwd)
    except Exception as e:  # noqa: BLE001 - an unsupported method is a result to record
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    if fwd_only:
        return result
    try:
        out = forward(*inputs)
        grad = torch.randn_like(out)
        timed("bwd", lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))
        timed("fwdbwd", lambda: torch.autograd.grad(forward(*inputs), inputs, grad))
    except Exception as e:  # noqa: BLE001
        result["error_bwd"] = f"{type(e).__name__}: {e}"[:500]
    return result


# ----------------------------------------------------------------------------- methods
def build_methods(case: dict, dtype, device, smoke: bool, wanted=METHODS) -> dict:
    """name -> (forward fn, inputs, credited forward FLOPs) or an error string."""
    from scalejepa.models.layers import Seqs
    from scalejepa.models.layers.attention import attend, sdpa_backend_pinned

    lengths, heads, head_dim = case["lengths"], case["heads"], case["head_dim"]
    total, num_seqs, longest, shortest = sum(lengths), len(lengths), max(lengths), min(lengths)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(total, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    seqs = Seqs.from_lengths(lengths, device)
    cu = seqs.cu_seqlens
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), torch.tensor(lengths, device=device))
    pos = torch.arange(total, device=device) - cu.long()[seq]
    packed_flops = attention_flops(lengths, heads, head_dim)
    methods = {}

    def packed(impl, sdpa_backend="auto"):  # the model's own attention on the packed tensors
        inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
        return (lambda q, k, v: attend(q, k, v, seqs, impl, sdpa_backend), inputs, packed_flops)

    methods["triton_varlen"] = packed("triton")
    methods["torch_varlen"] = packed("torch_varlen")
    methods["sdpa_nested_flash"] = packed("sdpa_nested", "flash")
    methods["sdpa_nested_cudnn"] = packed("sdpa_nested", "cudnn")

    def padded(t, length):  # (T, H, D) -> (S, H, length, D), zeros in the padding
        out = t.new_zeros(num_seqs, longest, heads, head_dim)
        out[seq, pos] = t
        return out[:, :length].transpose(1, 2).contiguous().requires_grad_()

    key_ok = (torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])
    attn_mask = key_ok[:, None, None, :]  # (S, 1, 1, L): broadcast over heads and queries

    def padded_sdpa(backend):
        def forward(q, k, v):
            with sdpa_backend_pinned(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return forward, tuple(padded(t, longest) for t in (q, k, v)), packed_flops

    methods["sdpa_padded"] = padded_sdpa("auto")
    methods["sdpa_padded_cudnn"] = padded_sdpa("cudnn")
    methods["sdpa_padded_backends"] = sdpa_backends(methods["sdpa_padded"][1], attn_mask)
    methods["sdpa_truncated"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                 tuple(padded(t, shortest) for t in (q, k, v)),
                                 attention_flops([shortest] * num_seqs, heads, head_dim))
    if "flex_document" not in wanted:
        return methods
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        methods["flex_document"] = f"ImportError: {e}"
    else:
        doc = seq

        def document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        block_mask = create_block_mask(document, None, None, total, total, device=str(device))
        if device.type == "cuda" and not smoke:
            flex = torch.compile(flex_attention, dynamic=False)
        else:  # eager flex for the smoke check: it warns that it is unfused, which is known
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex = flex_attention
        flat = tuple(t.transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for t in (q, k, v))  # (1,H,T,D)
        methods["flex_document"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask), flat, packed_flops)
    return methods


def sdpa_backends(inputs, attn_mask) -> list[str]:
    """SDPA backends that accept these inputs (dispatch picks the first in its priority order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    eligible = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                F.scaled_dot_product_attention(*inputs, attn_mask=attn_mask)
        except RuntimeError:  # "no available kernel": not eligible, which is what we record
            continue
        eligible.append(backend.name)
    return eligible


def summarise(raw: dict, fwd_flops: float) -> dict:
    out = dict(raw)
    for name, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
        if name in raw:
            ms = statistics.median(raw[name])
            out[f"{name}_ms"] = ms
            out[f"{name}_tflops"] = fwd_flops * mult / (ms * 1e-3) / 1e12
            out[f"{name}_kernel_ms"] = raw[f"{name}_kernel"]["ms_per_call"]
    out["credited_fwd_flops"] = fwd_flops
    return out


def library_within_margin(results: dict) -> dict:
    """The library paths whose fwd+bwd time is within 3% of triton_varlen's, with the model
    setting that selects each, and every path's ratio (event and kernel time)."""
    ours = results.get("triton_varlen", {})
    if "fwdbwd_ms" not in ours:
        return {}
    ratios = {name: {"fwdbwd_vs_triton": r["fwdbwd_ms"] / ours["fwdbwd_ms"],
                     "fwdbwd_kernel_vs_triton": r["fwdbwd_kernel_ms"] / ours["fwdbwd_kernel_ms"]
                     if ours["fwdbwd_kernel_ms"] else None}
              for name, r in results.items() if name in LIBRARY_PATHS and "fwdbwd_ms" in r}
    within = {name: LIBRARY_PATHS[name] for name, r in ratios.items() if r["fwdbwd_vs_triton"] <= LIBRARY_MARGIN}
    return {"margin": LIBRARY_MARGIN, "ratios": ratios, "within": within}


# ----------------------------------------------------------------------------- gathers
def gather_benchmarks(args, dtype, device) -> list[dict]:
    """Fused gather kernels vs their plain-PyTorch references (time only; memory-bound copies)."""
    from scalejepa.kernels import (build_predictor_input, build_predictor_input_reference, gather_tokens,
                                   gather_tokens_reference)

    if args.smoke:
        ctx_lens, tgt_lens, grid, dim, width = [5, 9, 3], [2, 3, 1, 4, 0, 2], 4, 40, 24
    else:  # ViT-H/14: 16x16 patches, width 1280, predictor width 384
        ctx_lens, tgt_lens, _ = mask_lengths(16, args.batch, args.seed)
        grid, dim, width = 16, 1280, 384
    num_images, num_patches = len(ctx_lens), grid * grid
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    def cu(lengths):
        return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)

    def indices(lengths):
        return torch.cat([torch.randperm(num_patches, generator=gen)[:n] for n in lengths]).to(device)

    x, pos = rand(num_images, num_patches, dim), rand(num_patches, dim).detach()
    ctx_idx, cu_ctx = indices(ctx_lens), cu(ctx_lens)
    ctx, mask_token = rand(sum(ctx_lens), width), rand(width)
    tgt_idx, cu_tgt, pos_p = indices(tgt_lens), cu(tgt_lens), rand(num_patches, width).detach()
    cases = [
        ("gather_tokens", (x,), {"triton": lambda x: gather_tokens(x, ctx_idx, cu_ctx, pos, validate=False),
                                 "reference": lambda x: gather_tokens_reference(x, ctx_idx, cu_ctx, pos)}),
        ("build_predictor_input", (ctx, mask_token), {
            "triton": lambda c, m: build_predictor_input(c, ctx_idx, cu_ctx, tgt_idx, cu_tgt, m, pos_p,
                                                         validate=False)[0],
            "reference": lambda c, m: build_predictor_input_reference(c, ctx_idx, cu_ctx, tgt_idx, cu_tgt, m,
                                                                      pos_p)[0]}),
    ]
    out = []
    for name, inputs, fns in cases:
        entry = {"name": name, "images": num_images, "context_tokens": sum(ctx_lens), "results": {}}
        for method, fn in fns.items():
            raw = measure(fn, inputs, args, device)
            entry["results"][method] = dict(raw, **{f"{k}_ms": statistics.median(raw[k])
                                                    for k in ("fwd", "bwd", "fwdbwd") if k in raw})
        r = entry["results"]
        if "fwdbwd_ms" in r["triton"] and "fwdbwd_ms" in r["reference"]:
            entry["triton_vs_reference_fwdbwd"] = r["triton"]["fwdbwd_ms"] / r["reference"]["fwdbwd_ms"]
        print(f"{name}: " + "  ".join(f"{m} fwd+bwd {r[m].get('fwdbwd_ms', math.nan):.3f} ms" for m in r), flush=True)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- output
def plot(results: dict, path: Path) -> str | None:
    """Bar chart of fwd+bwd (or fwd) time per case and method; returns a reason if skipped."""
    plt, reason = pyplot()
    if plt is None:
        return reason
    cases = results["cases"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(METHODS)
    def value(case, method, key):
        v = case["results"].get(method, {}).get(key, 0.0)
        if key == "fwdbwd_ms":  # relative to sdpa_padded: cases differ in size by 100x
            v /= case["results"].get("sdpa_padded", {}).get(key, math.nan)
        return v if math.isfinite(v) else 0.0

    for ax, key, label in ((axes[0], "fwdbwd_ms", "fwd+bwd time / sdpa_padded's (lower is better)"),
                           (axes[1], "fwd_tflops", "forward TFLOP/s (useful FLOPs)")):
        for i, method in enumerate(METHODS):
            vals = [value(c, method, key) for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [c["name"] for c in cases], rotation=15)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, f"{results['env']['device']}, {results['settings']['dtype']}", smoke=results["smoke"])
    return None


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="FLOPs: forward 4*sum(L^2)*head_dim*heads, backward 2.5x forward.")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results", help="where JSON and PNG go")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=128, help="images per GPU (context sequences)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30, help="timed samples; the median is reported")
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed sample (and per profile)")
    p.add_argument("--seed", type=int, default=0, help="mask / data seed")
    p.add_argument("--cases", default="", help="comma list of case names to run (default: all)")
    p.add_argument("--methods", default="", help=f"comma list of {', '.join(METHODS)} (default: all)")
    p.add_argument("--fwd-only", default="", help="comma list of cases timed forward only (e.g. long)")
    p.add_argument("--no-gathers", action="store_true", help="skip the fused-gather timings")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via the Triton interpreter (a check)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m] or list(METHODS)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.fwd_only = set(filter(None, args.fwd_only.split(",")))
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = benchmark_device("attention.py", args.smoke)
    if args.smoke:  # a check of the script, not a measurement: two calls each, no autotuning
        args.warmup, args.repeats, args.calls = 0, 1, 2
        os.environ.setdefault("SCALEJEPA_AUTOTUNE", "0")
    # Each case has fixed shapes, but a cuDNN plan per shape is what training would pay without it.
    os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")
    ensure_importable()
    dtype = DTYPES["fp32" if args.smoke and device.type == "cpu" else args.dtype]
    wanted = set(filter(None, args.cases.split(",")))

    results = {"env": environment(device), "smoke": args.smoke,
               "settings": {"dtype": str(dtype).removeprefix("torch."), "warmup": args.warmup,
                            "repeats": args.repeats, "calls_per_sample": args.calls, "batch": args.batch,
                            "seed": args.seed, "methods": args.methods, "fwd_only_cases": sorted(args.fwd_only),
                            "TORCH_CUDNN_SDPA_AVOID_RECOMPILE": os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"]},
               "timing": "median over samples of (time of --calls back-to-back calls between two CUDA events) / "
                         "--calls; *_kernel_ms: the profiler's device kernel time per call (CPU: operator time)",
               "flop_convention": "fwd = 4*sum(L_i^2)*head_dim*heads; bwd = 2.5*fwd; fwd+bwd = 3.5*fwd; "
                                  "each method credited with the useful FLOPs of the lengths it attends over",
               "cases": []}
    json_path = output_path(args.out_dir, "attention", results["env"], args.smoke)
    for case in make_cases(args):
        if wanted and case["name"] not in wanted:
            continue
        lengths = case["lengths"]
        entry = {k: v for k, v in case.items() if k != "lengths"}
        entry.update(num_seqs=len(lengths), tokens=sum(lengths), min_len=min(lengths), max_len=max(lengths),
                     mean_len=sum(lengths) / len(lengths), lengths=lengths,
                     padding_waste=1 - sum(n * n for n in lengths) / (len(lengths) * max(lengths) ** 2),
                     results={})
        print(f"{case['name']}: {len(lengths)} seqs, lengths {min(lengths)}-{max(lengths)} "
              f"(mean {entry['mean_len']:.1f}), {case['heads']} heads x {case['head_dim']}", flush=True)
        methods = build_methods(case, dtype, device, args.smoke, args.methods)
        entry["sdpa_padded_eligible_backends"] = methods.pop("sdpa_padded_backends")
        for name, method in methods.items():
            if name not in args.methods:
                continue
            if isinstance(method, str):
                entry["results"][name] = {"error": method}
                continue
            fn, inputs, flops = method
            raw = measure(fn, inputs, args, device, fwd_only=case["name"] in args.fwd_only)
            entry["results"][name] = summarise(raw, flops) if "fwd" in raw else raw
            r = entry["results"][name]
            print(f"  {name:17s} fwd {r.get('fwd_ms', math.nan):8.3f} ms  bwd {r.get('bwd_ms', math.nan):8.3f} ms  "
                  f"fwd+bwd {r.get('fwdbwd_ms', math.nan):8.3f} ms (kernels {r.get('fwdbwd_kernel_ms', math.nan):8.3f})"
                  f"  fwd {r.get('fwd_tflops', math.nan):7.1f} TFLOP/s  ran {r.get('ran', {}).get('backends')}"
                  + (f"  [{r.get('error') or r.get('error_bwd')}]" if "error" in r or "error_bwd" in r else ""),
                  flush=True)
        res = entry["results"]
        if "fwdbwd_ms" in res.get("triton_varlen", {}) and "fwdbwd_ms" in res.get("sdpa_padded", {}):
            entry["triton_vs_sdpa_padded_fwdbwd"] = res["triton_varlen"]["fwdbwd_ms"] / res["sdpa_padded"]["fwdbwd_ms"]
        entry["library_within_3pct"] = library_within_margin(res)
        results["cases"].append(entry)
        write_json(json_path, results)  # after every case: a run killed by its budget keeps what it measured

    results["gathers"] = [] if args.no_gathers else gather_benchmarks(args, dtype, device)

    by_name = {c["name"]: c for c in results["cases"]}
    results["targets"] = {}
    if "triton_vs_sdpa_padded_fwdbwd" in by_name.get("vith_context", {}):
        value = by_name["vith_context"]["triton_vs_sdpa_padded_fwdbwd"]
        target = TARGETS["vith_context_fwdbwd_vs_sdpa_padded"]
        results["targets"]["vith_context_fwdbwd_vs_sdpa_padded"] = dict(value=value, target_max=target,
                                                                        met=value <= target)
    if "fwd_tflops" in by_name.get("long", {}).get("results", {}).get("triton_varlen", {}):
        value = by_name["long"]["results"]["triton_varlen"]["fwd_tflops"]
        target = TARGETS["long_fwd_tflops"]
        results["targets"]["long_fwd_tflops"] = dict(value=value, target_min=target, met=value >= target)

    json_path = write_report(json_path, results, plot=plot)
    if "chart_skipped" in results:
        print(f"note: no chart ({results['chart_skipped']})", file=sys.stderr)
    print(f"wrote {json_path}" + (f" and {results['chart']}" if results["chart"] else ""))
    print(json.dumps(results["targets"], indent=1))
    return json_path


if __name__ == "__main__":
    main()
