import torch
from torch import nn


@torch.no_grad()
def init_vit_weights(module: nn.Module, std: float = 0.02) -> None:
    """The reference's effective init: trunc-normal(0.02) for Linear and Conv weights,
    zero biases, LayerNorm (1, 0). (Its depth-scaled rescale is undone by a later
    re-initialisation, so plain trunc-normal is what it trains from.)"""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
