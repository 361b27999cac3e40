"""timm directories (the layout ``timm.create_model("local-dir:DIR", pretrained=True)``
and the Hugging Face Hub's timm models use): ``config.json`` and ``model.safetensors``.

timm's ``VisionTransformer`` with ``class_token=False``, ``global_pool="avg"``,
``fc_norm=False`` and ``num_classes=0`` is our encoder: the same parameter names (ours
follow the reference, which followed timm), a learned-shape ``pos_embed`` of one row per
patch, LayerNorm eps 1e-6, exact GELU, and features = the mean of the final-normed patch
tokens. So the weights go in as they are, and ``model_args`` carries our shape. timm's own
I-JEPA entries (``vit_huge_patch14_gap_224.in1k_ijepa``, ...) are built the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scalejepa.data.transforms import eval_resize
from scalejepa.eval.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, EncoderWeights, WeightsError, infer_spec, \
    spec_with_heads
from scalejepa.formats.safetensors_file import WEIGHTS_FILE, read_weights_dir, save_safetensors
from scalejepa.models.vit import VitSize

CONFIG_FILE = "config.json"
# timm's entry point for our named sizes where it has a no-class-token, average-pool one;
# model_args carries the full shape, so any ViT entry point builds the right model.
_ARCHITECTURES = {"vit_huge": "vit_huge_patch14_gap_224", "vit_giant": "vit_giant_patch16_gap_224"}
_DEFAULT_ARCHITECTURE = "vit_base_patch16_gap_224"
_HEADS_AND_EXTRAS = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "cls_token", "reg_token")


def _ratio_for(hidden: int, width: int) -> float:
    """An mlp_ratio that timm's ``int(width * mlp_ratio)`` turns back into ``hidden``."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _crop_pct_for(size: int) -> float:
    """A crop_pct whose ``floor(size / crop_pct)`` (timm's eval resize) is our resize."""
    resize = eval_resize(size)
    crop_pct = size / resize
    while math.floor(size / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def timm_config(spec: EncoderSpec, size: VitSize, licence: str | None) -> dict[str, Any]:
    channels, pixels = spec.in_chans, spec.image_size
    pretrained_cfg = {
        "input_size": [channels, pixels, pixels],
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": _crop_pct_for(pixels),
        "crop_mode": "center",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "num_classes": 0,
    }
    if licence:
        pretrained_cfg["license"] = licence
    return {
        "architecture": _ARCHITECTURES.get(spec.arch, _DEFAULT_ARCHITECTURE),
        "num_classes": 0,
        "num_features": size.embed_dim,
        "global_pool": "avg",
        "model_args": {
            "img_size": pixels, "patch_size": spec.patch_size, "in_chans": channels, "embed_dim": size.embed_dim,
            "depth": size.depth, "num_heads": size.num_heads,
            "mlp_ratio": _ratio_for(size.mlp_hidden_dim, size.embed_dim),
            "class_token": False, "global_pool": "avg", "fc_norm": False, "num_classes": 0,
        },
        "pretrained_cfg": pretrained_cfg,
    }


def write_timm_dir(folder: Path, weights: EncoderWeights, size: VitSize, sidecar: dict[str, Any]) -> None:
    config = timm_config(weights.spec, size, weights.licence)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors(weights.state_dict, folder / WEIGHTS_FILE, sidecar)


def is_timm_dir(folder: Path) -> bool:
    config = folder / CONFIG_FILE
    return config.is_file() and "architecture" in json.loads(config.read_text())


def read_timm_dir(folder: Path) -> EncoderWeights:
    """A timm ViT directory without class token or classifier (ours, or any such timm model)."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    state, sidecar = read_weights_dir(folder)
    extras = [k for k in _HEADS_AND_EXTRAS if k in state]
    if extras:
        raise WeightsError(f"{folder}: weights {extras} have no place in a scalejepa encoder (expected a timm ViT with "
                           "class_token=False, fc_norm=False, num_classes=0)")
    args = config.get("model_args", {})
    cfg = config.get("pretrained_cfg", {})
    norm = {"mean": cfg.get("mean", IMAGENET_MEAN), "std": cfg.get("std", IMAGENET_STD)}
    shapes = {k: v.shape for k, v in state.items()}
    spec = spec_with_heads(shapes, int(args["num_heads"]), **norm) if "num_heads" in args else infer_spec(shapes, **norm)
    sidecar = sidecar or {}
    return EncoderWeights(state, spec, str(folder), step=sidecar.get("step"), seed=int(sidecar.get("seed", 0)),
                          licence=sidecar.get("licence") or cfg.get("license"))
