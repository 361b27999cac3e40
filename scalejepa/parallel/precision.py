"""Compute dtypes from the config, shared by every backend."""

from __future__ import annotations

import torch

from scalejepa.config import Config


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The compute dtype of ``train.precision`` (auto: bf16 on GPU, fp32 on CPU); None for fp32."""
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def resolve_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
