"""Same weights, images and masks: does our I-JEPA step compute what the reference's does?

The reference code (facebookresearch/ijepa, kept out of git: ``git clone
https://github.com/facebookresearch/ijepa third_party/ijepa``) is imported side by side.
Its encoder, target encoder and predictor are built with our models' shapes and loaded
with our weights (biases, LayerNorms and the target perturbed first, so every parameter
matters); masks come from its own ``MaskCollator`` and are packed into our ``MaskBatch``
by ``MaskGenerator.pack``. Compared stage by stage, in float32: the target encoder,
the targets (layer norm, gather, repeat over context blocks), the context encoder, the
predictor, the loss and every parameter's gradient. Any difference beyond round-off is a
bug in ours (the reference's step is the specification for ``mask.mode=reference``).

    python benchmarks/reference_equivalence.py --config debug_cpu --draws 5

Writes ``benchmarks/results/reference_equivalence_<stamp>.json``; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import _common

_common.ensure_importable()

from _reference_ijepa import (  # noqa: E402
    DEFAULT_REFERENCE_DIR,
    ReferenceUnavailable,
    _import_reference,
    reference_collator,
)
from scalejepa.config import load_config  # noqa: E402
from scalejepa.ijepa import build_models, compute_targets  # noqa: E402
from scalejepa.masks import MaskGenerator  # noqa: E402

# float32 round-off over a few blocks is ~1e-6 of the values; a real difference (a wrong
# position, a missing norm) is of the order of the values themselves.
RELATIVE_TOLERANCE = 1e-4


def reference_models(model_config, encoder, predictor):
    """The reference's encoder class twice (context, target) and its predictor, in our
    shapes (after ``_import_reference`` has put its checkout on the path)."""
    import src.models.vision_transformer as ref_vit

    norm = partial(nn.LayerNorm, eps=1e-6)  # as every reference constructor sets it
    mlp_ratio = encoder.blocks[0].mlp.fc1.out_features / encoder.embed_dim

    def make_encoder():
        return ref_vit.VisionTransformer(
            img_size=[model_config.image_size], patch_size=model_config.patch_size, in_chans=model_config.in_chans,
            embed_dim=encoder.embed_dim, depth=len(encoder.blocks), num_heads=encoder.num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)

    ref_predictor = ref_vit.vit_predictor(
        num_patches=encoder.num_patches, embed_dim=encoder.embed_dim, predictor_embed_dim=predictor.pred_dim,
        depth=len(predictor.predictor_blocks), num_heads=predictor.predictor_blocks[0].attn.num_heads)
    return make_encoder(), make_encoder(), ref_predictor


@torch.no_grad()
def load_ours_into(ours: nn.Module, ref: nn.Module) -> list[str]:
    """Copy every tensor by name (the fixed sin-cos tables stay each side's own, and are
    compared); returns the problems found (missing names, shapes, tables)."""
    src, dst = ours.state_dict(), ref.state_dict()
    problems = [f"only ours: {k}" for k in sorted(set(src) - set(dst))]
    problems += [f"only the reference's: {k}" for k in sorted(set(dst) - set(src))]
    for name in sorted(set(src) & set(dst)):
        if src[name].shape != dst[name].shape:
            problems.append(f"{name}: shape {tuple(src[name].shape)} vs {tuple(dst[name].shape)}")
        elif "pos_embed" in name:
            if not torch.allclose(src[name].float(), dst[name].float(), atol=1e-6):
                problems.append(f"{name}: the sin-cos tables differ")
        else:
            dst[name].copy_(src[name])
    return problems


def max_relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def compare_draw(config, models, ref, collator, helpers, batch: int, seed: int) -> dict:
    model, target = models
    ref_encoder, ref_target, ref_predictor = ref
    apply_masks, repeat_interleave_batch = helpers
    torch.manual_seed(seed)
    images = torch.randn(batch, 3, config.model.image_size, config.model.image_size)
    _, masks_enc, masks_pred = collator([images[i] for i in range(batch)])
    grid_patches = model.encoder.num_patches
    context = np.zeros((batch, grid_patches), dtype=bool)
    context[np.arange(batch)[:, None], masks_enc[0].numpy()] = True
    targets = np.zeros((batch, len(masks_pred), grid_patches), dtype=bool)
    for m, block in enumerate(masks_pred):
        targets[np.arange(batch)[:, None], m, block.numpy()] = True
    # The collator has truncated already (to the batch minimum, keeping raster order).
    packer = MaskGenerator(model.encoder.patch_embed.grid_size, dataclasses.replace(config.mask, context="pack"))
    masks = packer.pack(context, targets)

    with torch.no_grad():
        ref_features = ref_target(images)
        ref_h = F.layer_norm(ref_features, (model.encoder.embed_dim,))
        ref_h = repeat_interleave_batch(apply_masks(ref_h, masks_pred), batch, repeat=len(masks_enc))
        our_h = compute_targets(target, images, masks)
        stages = {"target_encoder": max_relative(target(images).view(batch, grid_patches, -1), ref_features),
                  "targets": max_relative(our_h, ref_h.reshape(-1, ref_h.shape[-1]))}
    ref_context = ref_encoder(images, masks_enc)
    our_context = model.encoder(images, masks.context)
    stages["context_encoder"] = max_relative(our_context, ref_context.reshape(-1, ref_context.shape[-1]))
    ref_pred = ref_predictor(ref_context, masks_enc, masks_pred)
    our_pred = model.predictor(our_context, masks)
    stages["predictor"] = max_relative(our_pred, ref_pred.reshape(-1, ref_pred.shape[-1]))
    ref_loss = F.smooth_l1_loss(ref_pred, ref_h)
    our_loss = model(images, masks, our_h)  # the module's own forward, as training calls it
    stages["loss"] = max_relative(our_loss, ref_loss)
    for module in (model, ref_encoder, ref_predictor):
        module.zero_grad(set_to_none=True)
    ref_loss.backward()
    our_loss.backward()
    for name, ours, theirs in (("encoder", model.encoder, ref_encoder), ("predictor", model.predictor, ref_predictor)):
        theirs_grads = dict(theirs.named_parameters())
        stages[f"{name}_grads"] = max(max_relative(p.grad, theirs_grads[n].grad) for n, p in ours.named_parameters())
    return {"seed": seed, "context_tokens": int(masks_enc[0].shape[1]),
            "target_tokens_per_block": int(masks_pred[0].shape[1]), "max_relative_difference": stages}


def reference_commit(ref_dir: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(ref_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="debug_cpu")
    parser.add_argument("--reference-dir", type=Path, default=DEFAULT_REFERENCE_DIR)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--draws", type=int, default=5, help="mask draws (and image batches) to compare")
    parser.add_argument("--out-dir", type=Path, default=_common.RESULTS_DIR)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (model shape, masks)")
    args = parser.parse_args(argv)

    config = load_config(args.config, [*args.overrides, "model.attn_impl=sdpa"])
    if config.mask.mode != "reference":
        raise SystemExit("the reference's collator is the specification of mask.mode=reference only")
    torch.manual_seed(config.train.seed)
    model, target = build_models(config.model, config.train.loss)
    with torch.no_grad():  # every parameter off its init (zero biases, unit norms), the target off the encoder
        for p in [*model.parameters(), *target.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    try:
        _, _, MaskCollator, apply_masks, _, repeat_interleave_batch = _import_reference(args.reference_dir)
    except ReferenceUnavailable as exc:
        raise SystemExit(str(exc)) from None
    ref = reference_models(config.model, model.encoder, model.predictor)
    problems = [f"encoder {p}" for p in load_ours_into(model.encoder, ref[0])]
    problems += [f"target {p}" for p in load_ours_into(target, ref[1])]
    problems += [f"predictor {p}" for p in load_ours_into(model.predictor, ref[2])]
    if config.train.loss != "smooth_l1":
        problems.append(f"train.loss={config.train.loss}: the reference uses smooth_l1")
    collator = reference_collator(MaskCollator, config)
    draws = []
    for i in range(args.draws):
        draws.append(compare_draw(config, (model, target), ref, collator, (apply_masks, repeat_interleave_batch),
                                  args.batch, seed=i))
        worst = max(draws[-1]["max_relative_difference"].items(), key=lambda kv: kv[1])
        _common.progress(f"draw {i}: context {draws[-1]['context_tokens']} tokens, worst stage {worst[0]} "
                         f"{worst[1]:.1e}")
    stages = draws[0]["max_relative_difference"]
    worst = {stage: max(d["max_relative_difference"][stage] for d in draws) for stage in stages}
    problems += [f"{stage}: relative difference {value:.1e} > {RELATIVE_TOLERANCE:.0e}"
                 for stage, value in worst.items() if value > RELATIVE_TOLERANCE]
    env = _common.environment(torch.device("cpu"))
    env["reference_commit"] = reference_commit(args.reference_dir)
    results = {"benchmark": "reference_equivalence", "env": env, "config": args.config,
               "overrides": list(args.overrides), "batch": args.batch, "tolerance": RELATIVE_TOLERANCE,
               "worst_relative_difference": worst, "draws": draws, "problems": problems,
               "equivalent": not problems}
    path = _common.write_json(_common.output_path(args.out_dir, "reference_equivalence", env, smoke=False), results)
    for stage, value in worst.items():
        print(f"{stage:18s} max relative difference {value:.2e}")
    print(("EQUIVALENT" if not problems else "DIFFERENT:\n  " + "\n  ".join(problems)) + f"\nwrote {path}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
