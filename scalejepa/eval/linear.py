"""Linear probe on frozen, cached features.

One linear head per learning rate, all trained together on the same mini-batches (one
pass over the cached features per epoch): SGD with momentum 0.9 and a cosine schedule,
cross-entropy, zero init. Features are standardised with the training part's mean and
std (a non-affine BatchNorm, as MAE's probe). A held-out part of the training split picks
the learning rate; the chosen head is reported on the validation split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
EPOCHS = 100
BATCH_SIZE = 256
HOLDOUT_FRACTION = 0.1
MOMENTUM = 0.9


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices), a seeded random split."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    held = max(1, round(n * fraction))
    if n - held < 1:
        raise ValueError(f"{n} training samples are too few to hold {fraction:.0%} out")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held:], perm[:held]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent; logits (..., N, C), labels (N,): per leading index."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels.to(logits.device)[:, None]
    n = labels.numel()
    return 100.0 * hits[..., 0].sum(-1).float() / n, 100.0 * hits.any(-1).sum(-1).float() / n


@torch.no_grad()
def _logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    return torch.cat([torch.einsum("nd,ldc->lnc", x[i:i + batch], weight) + bias[:, None]
                      for i in range(0, x.shape[0], batch)], dim=1)


def train_heads(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    *,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads (L, D, C) weights and (L, C) biases, one per learning rate.

    Each head's loss depends only on its own parameters, so summing the losses and taking
    one backward gives every head its own gradient; the update scales it by the head's lr.
    """
    device, (n, dim), heads = features.device, features.shape, len(lrs)
    weight = torch.zeros(heads, dim, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(heads, num_classes, device=device, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    lr = torch.tensor(lrs, device=device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps, step = epochs * steps_per_epoch, 0
    labels = labels.to(device)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            index = perm[start:start + batch_size]
            x, y = features[index], labels[index]
            logits = torch.einsum("nd,ldc->lnc", x, weight) + bias[:, None]
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(heads), reduction="sum") / len(y)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
            scale = 0.5 * (1 + math.cos(math.pi * step / total_steps))
            with torch.no_grad():
                grad_w.add_(weight, alpha=weight_decay)  # no decay on biases
                for param, grad, buf in ((weight, grad_w, buffers[0]), (bias, grad_b, buffers[1])):
                    buf.mul_(MOMENTUM).add_(grad)
                    param.sub_(buf * (lr * scale).view(-1, *[1] * (param.dim() - 1)))
            step += 1
    return weight.detach(), bias.detach()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    lrs: Sequence[float] = LRS,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    weight_decay: float = 0.0,
    holdout_fraction: float = HOLDOUT_FRACTION,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
) -> dict:
    """Train, pick the lr on the held-out part of the training split, report on val.

    Returns ``top1`` / ``top5`` (percent, val, chosen head), ``best_lr`` and ``per_lr``
    rows (lr, held-out top-1, val top-1) for the table."""
    if not lrs:
        raise ValueError("give at least one learning rate")
    device = torch.device(device)
    classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    fit, held = holdout_split(train_features.shape[0], holdout_fraction, seed)
    x_fit = train_features[fit].to(device).float()
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return (x.to(device).float() - mean) / std

    weight, bias = train_heads(prepare(train_features[fit]), train_labels[fit], classes,
                               lrs, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    held_top1, _ = accuracy(_logits(weight, bias, prepare(train_features[held])), train_labels[held])
    val_top1, val_top5 = accuracy(_logits(weight, bias, prepare(val_features)), val_labels)
    best = int(torch.argmax(held_top1))  # ties: the first listed
    return {
        "top1": _pct(val_top1[best]),
        "top5": _pct(val_top5[best]),
        "best_lr": float(lrs[best]),
        "holdout_top1": _pct(held_top1[best]),
        "per_lr": [{"lr": float(lr), "holdout_top1": _pct(h), "val_top1": _pct(v)}
                   for lr, h, v in zip(lrs, held_top1, val_top1)],
        "fit_samples": int(fit.numel()),
        "holdout_samples": int(held.numel()),
        "val_samples": int(val_labels.numel()),
        "epochs": epochs,
    }


def _pct(value: torch.Tensor) -> float:
    return round(float(value), 4)  # float32 percentages: drop the 80.9000015 noise
