"""Collapse monitors on a batch of features (N, D), pure functions.

* ``feature_std``: mean over dimensions of the per-dimension standard deviation across
  the N rows. It falls to 0 when every row becomes the same vector (complete collapse).
  On the layer-normed I-JEPA targets (zero mean, unit variance per token) a healthy value
  is a sizeable fraction of 1.
* ``rankme``: RankMe (Garrido et al., 2023), the effective rank exp(H(p)) of the
  singular values s of the (N, D) matrix, p = s / sum(s) + 1e-7. Between 1 (collapse to
  a line) and min(N, D); a dimensional collapse shows as a falling RankMe while the std
  stays up.
* ``position_share``: on full token grids (B, N, D), the share of the layer-normed
  tokens' variance that the patch position alone explains (the variance of the
  per-position mean over images, over the total variance). Near 1, every image's tokens
  are the same function of position: a predictor can match the targets without looking
  at the context, and the features carry little about the image (a collapse that RankMe
  on a batch of targets at mixed positions does not show).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """0-d tensor: mean per-dimension std over the rows (no host sync)."""
    _check(features)
    return features.float().std(dim=0).mean()


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """Singular values of (N, D), from the eigenvalues of the smaller Gram matrix
    (min(N, D) squared, in float64): much cheaper than an SVD of a tall matrix."""
    x = features.float()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    return torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt()


def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> torch.Tensor:
    """0-d tensor: RankMe effective rank (no host sync on the result itself)."""
    _check(features)
    s = singular_values(features)
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return torch.exp(-(p * p.log()).sum()).float()


def collapse_metrics(features: torch.Tensor, max_rows: int = 8192) -> dict[str, float]:
    """``{"feature_std", "rankme"}`` of (N, D) features, with one host sync.

    At most ``max_rows`` rows are used (an even stride over them, deterministic), which
    bounds the cost when N is every token of a batch."""
    _check(features)
    features = features.detach()
    if features.shape[0] > max_rows:
        stride = -(-features.shape[0] // max_rows)
        features = features[::stride]
    values = torch.stack([feature_std(features), rankme(features)]).tolist()
    return {"feature_std": values[0], "rankme": values[1]}


def position_moments(tokens: torch.Tensor) -> torch.Tensor:
    """Sums that :func:`position_share_from_moments` needs, of (B, N, D) tokens, layer-normed
    first: one flat float64 tensor [per-position sums (N * D), sum of squares, count B].
    Moments of several batches (or ranks) add up, so the share stays exact when summed;
    an empty batch (B = 0) gives zeros."""
    if tokens.dim() != 3:
        raise ValueError(f"position moments need (B, N, D) tokens, got shape {tuple(tokens.shape)}")
    t = F.layer_norm(tokens.float(), tokens.shape[-1:]).double()
    count = torch.tensor([t.square().sum(), t.shape[0]], dtype=torch.float64, device=t.device)
    return torch.cat([t.sum(0).flatten(), count])


def position_share_from_moments(moments: torch.Tensor, num_patches: int) -> torch.Tensor:
    """0-d tensor: the position share of the tokens whose moments were summed."""
    sums, square_sum, count = moments[:-2].view(num_patches, -1), moments[-2], moments[-1]
    per_position = sums / count  # (N, D): the mean token at each position
    mean = per_position.mean(0)
    total = square_sum / (count * num_patches) - mean.square().sum()
    between = (per_position - mean).square().sum(1).mean()
    return (between / total.clamp_min(torch.finfo(total.dtype).tiny)).float()


def position_share(tokens: torch.Tensor) -> torch.Tensor:
    """0-d tensor: the position share of (B, N, D) tokens (no host sync)."""
    return position_share_from_moments(position_moments(tokens), tokens.shape[1])


def _check(features: torch.Tensor) -> None:
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"collapse monitors need an (N, D) tensor with N >= 2 rows, got shape {tuple(features.shape)}")
