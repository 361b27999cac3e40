"""Checkpoints of the reference I-JEPA (facebookresearch/ijepa).

The reference saves one ``torch.save`` dict per checkpoint with ``encoder``,
``predictor`` and ``target_encoder`` state dicts (each model was wrapped in
DistributedDataParallel, so every key starts with ``module.``), next to ``opt``,
``scaler``, ``epoch``, ``loss``, ``batch_size``, ``world_size`` and ``lr``. Our parameter
names are the reference's (timm's), and its fixed sin-cos tables (``pos_embed``,
``predictor_pos_embed``, parameters there and buffers here) have the same shapes, so the
mapping is: strip the wrapper prefixes, check the names, load.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

from scalejepa.eval.spec import EncoderSpec, EncoderWeights, WeightsError, check_fits, infer_spec, strip_wrappers
from scalejepa.ijepa import build_models

REFERENCE_ENTRIES = ("encoder", "predictor", "target_encoder")
_PRED_BLOCK_KEY = re.compile(r"^predictor_blocks\.(\d+)\.")


def is_reference_checkpoint(obj: Any) -> bool:
    """A dict with the reference's ``encoder`` or ``target_encoder`` state dict."""
    return isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in ("encoder", "target_encoder"))


def reference_entry(checkpoint: Mapping[str, Any], entry: str) -> dict[str, torch.Tensor]:
    """One of ``encoder`` / ``predictor`` / ``target_encoder``, in our names."""
    if entry not in REFERENCE_ENTRIES:
        raise WeightsError(f"unknown reference entry {entry!r}; choose one of {', '.join(REFERENCE_ENTRIES)}")
    raw = checkpoint.get(entry)
    if not isinstance(raw, Mapping):
        present = [k for k in REFERENCE_ENTRIES if isinstance(checkpoint.get(k), Mapping)]
        raise WeightsError(f"the reference checkpoint has no {entry!r} state dict (it has: {', '.join(present)})")
    return strip_wrappers(raw)


def reference_encoder_state(checkpoint: Mapping[str, Any], entry: str = "target_encoder") -> dict[str, torch.Tensor]:
    """The (target) encoder's weights in our names, checked against the architecture
    its shapes imply."""
    state = reference_entry(checkpoint, entry)
    spec = infer_spec({k: v.shape for k, v in state.items()})
    check_fits(EncoderWeights(state, spec, f"reference {entry}"))
    return state


def reference_spec(checkpoint: Mapping[str, Any]) -> EncoderSpec:
    entry = "target_encoder" if isinstance(checkpoint.get("target_encoder"), Mapping) else "encoder"
    state = reference_entry(checkpoint, entry)
    return infer_spec({k: v.shape for k, v in state.items()})


def load_reference_checkpoint(checkpoint: Mapping[str, Any] | str, *, pred_heads: int = 0, strict: bool = True):
    """Our ``(IJEPA, target encoder)`` with the reference checkpoint's weights.

    ``checkpoint``: the loaded dict or a path. The predictor's width and depth come from
    its shapes; its head count cannot, so it defaults to the encoder's (the reference's
    choice) unless ``pred_heads`` is given.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    spec = reference_spec(checkpoint)
    predictor = reference_entry(checkpoint, "predictor")
    if "predictor_embed.weight" not in predictor:
        raise WeightsError("the reference predictor has no 'predictor_embed.weight': not an I-JEPA predictor")
    pred_dim = predictor["predictor_embed.weight"].shape[0]
    pred_depth = len({int(m.group(1)) for k in predictor if (m := _PRED_BLOCK_KEY.match(k))})
    config = dataclasses.replace(spec.model_config(), pred_dim=pred_dim, pred_depth=pred_depth, pred_heads=pred_heads)
    model, target = build_models(config)
    _load(model.encoder, reference_entry(checkpoint, "encoder"), "encoder", strict)
    _load(model.predictor, predictor, "predictor", strict)
    _load(target, reference_entry(checkpoint, "target_encoder"), "target_encoder", strict)
    return model, target


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], entry: str, strict: bool) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise WeightsError(f"reference {entry} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
