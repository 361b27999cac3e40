"""Collapse monitors on a batch of features (N, D), pure functions.

* ``feature_std``: mean over dimensions of the per-dimension standard deviation across
  the N rows. It falls to 0 when every row becomes the same vector (complete collapse).
  On the layer-normed I-JEPA targets (zero mean, unit variance per token) a healthy value
  is a sizeable fraction of 1.
* ``rankme``: RankMe (Garrido et al., 2023), the effective rank exp(H(p)) of the
  singular values s of the (N, D) matrix, p = s / sum(s) + 1e-7. Between 1 (collapse to
  a line) and min(N, D); a dimensional collapse shows as a falling RankMe while the std
  stays up.
"""

from __future__ import annotations

import torch

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


def _check(features: torch.Tensor) -> None:
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"collapse monitors need an (N, D) tensor with N >= 2 rows, got shape {tuple(features.shape)}")
