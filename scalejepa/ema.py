"""EMA of the context encoder into the target encoder with multi-tensor ops.

``foreach=False`` updates one parameter at a time, as the reference code does
(``param_k.mul_(m).add_((1 - m) * param_q)``): only for benchmark baselines.
"""

from __future__ import annotations

import torch
from torch import nn


def local_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters as plain tensors; the local shards of FSDP2's DTensors (the target
    encoder is sharded exactly like the context encoder, so shards line up)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]


class EMA:
    def __init__(self, target: nn.Module, online: nn.Module, foreach: bool = True):
        self.foreach = foreach
        self.target = [t.detach() for t in local_tensors(target)]
        self.online = [t.detach() for t in local_tensors(online)]
        if len(self.target) != len(self.online) or any(
            a.shape != b.shape for a, b in zip(self.target, self.online)
        ):
            raise ValueError("target and online encoders must have identically shaped (and sharded) parameters")

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, one fused call."""
        if self.foreach:
            torch._foreach_lerp_(self.target, self.online, 1.0 - momentum)
            return
        for target, online in zip(self.target, self.online):  # the reference's loop (baselines)
            target.mul_(momentum).add_((1.0 - momentum) * online)
