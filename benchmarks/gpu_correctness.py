"""One I-JEPA training step on this project's Triton kernels (``model.attn_impl=triton``,
``model.gather_impl=triton``) against the same step on PyTorch's (``sdpa``, ``torch``).

Both run the same weights (the triton model loads the sdpa model's state dict), the same
synthetic images and the same masks (``mask.context=pack``: every sampled context token
kept, so sequence lengths vary and the varlen kernels, the gathers and SDPA's padding masks
are all exercised), under the training precision (bf16 autocast on a GPU). Compared: the
loss (target encoder forward, context encoder, predictor) and the gradients of every
trained parameter after one backward. A wrong kernel gives O(1) differences; two correct
bf16 implementations differ by rounding.

    python benchmarks/gpu_correctness.py                     # ViT-H/14, 32 images, on the GPU
    python benchmarks/gpu_correctness.py --smoke             # tiny model on CPU (Triton interpreter)

Writes ``gpu_correctness_<UTC stamp>.json`` (device, versions, losses, errors, tolerances,
timings) to ``--out-dir`` and exits 1 when a tolerance is exceeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    RESULTS_DIR, benchmark_device, ensure_importable, environment, output_path, progress, write_json,
)

ensure_importable()

# Relative tolerances (loss, global gradient norm of the difference) by compute precision:
# bf16 rounds every matmul input to 8 bits of mantissa, and the two paths round differently.
TOLERANCE = {"bf16": {"loss": 1e-2, "grad": 1e-1}, "fp32": {"loss": 1e-4, "grad": 1e-3}}
GATHERS = {"sdpa": "torch", "triton": "triton"}  # the gathers each side runs (model.gather_impl)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_h14_in1k_ep300")
    p.add_argument("--batch", type=int, default=32, help="images (the step's loss does not need 128 to compare)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="debug_cpu preset, 2 images, on CPU via the Triton interpreter")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    return args


def one_step(model, target, images, masks, autocast_dtype) -> tuple[float, dict[str, torch.Tensor], float]:
    """(loss, gradients by parameter name, seconds) of one forward + backward."""
    from scalejepa.ijepa import compute_targets

    device = images.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type,
                                                                                                 enabled=False)
    with ctx:
        targets = compute_targets(target, images, masks)
        loss = model(images, masks, targets)
    loss.backward()
    sync()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, time.perf_counter() - t0


def compare(args, device: torch.device) -> dict:
    from scalejepa.config import load_config
    from scalejepa.ijepa import build_models
    from scalejepa.masks import MaskGenerator, mask_rng

    precision = "bf16" if device.type == "cuda" else "fp32"
    overrides = [f"train.batch_size={args.batch}", "mask.context=pack", *args.override]
    if args.smoke:
        overrides = ["mask.min_keep=4", *overrides]
    config = load_config(args.preset, overrides)
    grid = config.model.image_size // config.model.patch_size
    masks = MaskGenerator(grid, config.mask)(args.batch, mask_rng(args.seed, 0, 0, 0)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    images = torch.randn(args.batch, config.model.in_chans, config.model.image_size, config.model.image_size,
                         generator=gen).to(device)

    t0 = time.perf_counter()
    built = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = dataclasses.replace(config.model, attn_impl=impl, gather_impl=GATHERS[impl])
            built[impl] = build_models(model, config.train.loss)
    for src, dst in zip(built["sdpa"], built["triton"]):  # same weights, exactly
        dst.load_state_dict(src.state_dict(), strict=True)
    build_s = time.perf_counter() - t0
    progress(f"built {config.model.arch} twice in {build_s:.1f} s; {args.batch} images, "
             f"context tokens {masks.context_tokens}, target tokens {masks.target_tokens}")

    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    steps = {}
    for impl, (model, target) in built.items():
        steps[impl] = one_step(model, target, images, masks, autocast_dtype)
        progress(f"  {impl}: loss {steps[impl][0]:.6f} in {steps[impl][2]:.2f} s (first call: includes compiling)")

    (loss_s, grads_s, time_s), (loss_t, grads_t, time_t) = steps["sdpa"], steps["triton"]
    missing = sorted(set(grads_s) ^ set(grads_t))
    diff_sq = sum(float((grads_t[n] - grads_s[n]).pow(2).sum()) for n in grads_s if n in grads_t)
    ref_sq = sum(float(g.pow(2).sum()) for g in grads_s.values())
    per_param = {n: float((grads_t[n] - grads_s[n]).norm() / grads_s[n].norm().clamp_min(1e-30))
                 for n in grads_s if n in grads_t}
    worst = max(per_param, key=per_param.get) if per_param else None
    tol = TOLERANCE[precision]
    loss_rel = abs(loss_t - loss_s) / max(abs(loss_s), 1e-30)
    grad_rel = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-30)
    finite = all(math.isfinite(x) for x in (loss_s, loss_t, grad_rel))
    checks = {"loss": finite and loss_rel <= tol["loss"], "grad": finite and grad_rel <= tol["grad"],
              "same_parameters": not missing}
    return {
        "settings": {"preset": args.preset, "arch": config.model.arch, "batch": args.batch, "seed": args.seed,
                     "precision": precision, "overrides": overrides, "context_mode": "pack"},
        "tokens": {"context": masks.context_tokens, "target": masks.target_tokens},
        "loss": {"sdpa": loss_s, "triton": loss_t, "relative_difference": loss_rel},
        "gradients": {"relative_error_global": grad_rel, "worst_parameter": worst,
                      "worst_parameter_relative_error": per_param.get(worst), "parameters_compared": len(per_param),
                      "parameters_without_grad_in_one": missing},
        "tolerance": tol, "checks": checks, "passed": all(checks.values()),
        "seconds": {"build_both": build_s, "step_sdpa": time_s, "step_triton": time_t},
        "peak_memory_allocated_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                      if device.type == "cuda" else None),
    }


def pick_device(args) -> torch.device:
    """The GPU; or, for --smoke, the CPU with the Triton interpreter and the tiny preset."""
    device = benchmark_device("gpu_correctness.py", args.smoke)
    if device.type == "cuda":
        return device
    if args.preset == "vit_h14_in1k_ep300":
        args.preset = "debug_cpu"
    if args.batch == 32:
        args.batch = 2
    torch.set_num_threads(1)
    return torch.device("cpu")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    env = environment(device)
    results = {"benchmark": "gpu_correctness", "env": env, "smoke": args.smoke, **compare(args, device)}
    path = output_path(args.out_dir, "gpu_correctness", env, args.smoke)
    write_json(path, results)
    verdict = "PASS" if results["passed"] else "FAIL"
    progress(f"{verdict}: loss sdpa {results['loss']['sdpa']:.6f} triton {results['loss']['triton']:.6f} "
             f"(rel {results['loss']['relative_difference']:.2e} <= {results['tolerance']['loss']:g}?), gradients rel "
             f"{results['gradients']['relative_error_global']:.2e} <= {results['tolerance']['grad']:g}?; wrote {path}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
