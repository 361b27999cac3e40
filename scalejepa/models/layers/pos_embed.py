"""Fixed 2-D sine-cosine position embeddings (MAE / I-JEPA layout)."""

import torch


def sincos_pos_embed_2d(dim: int, grid_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(grid_size**2, dim) embedding in raster order. As in the reference, the first half
    of the channels encodes the column (x) and the second half the row (y)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).to(dtype)
