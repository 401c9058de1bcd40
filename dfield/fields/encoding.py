"""Sinusoidal positional encoding (NeRF), shared by the MLP baseline and the grid field's colour head."""

from __future__ import annotations

import torch


def positional_encoding(x: torch.Tensor, n_freqs: int, include_input: bool = True) -> torch.Tensor:
    """x (N, D) -> (N, D * (2 * n_freqs + include_input)): [x, sin(2^k x), cos(2^k x)]."""
    if n_freqs == 0:
        return x if include_input else x[:, :0]
    freqs = 2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)
    xb = (x[:, None, :] * freqs[:, None]).reshape(x.shape[0], n_freqs * x.shape[1])
    parts = [x] if include_input else []
    return torch.cat(parts + [torch.sin(xb), torch.cos(xb)], -1)


def encoding_dim(d: int, n_freqs: int, include_input: bool = True) -> int:
    """Width of `positional_encoding` of a `d`-wide input: d * (2 * n_freqs + include_input)."""
    return d * (2 * n_freqs + int(include_input))
