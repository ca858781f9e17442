"""Small tensor helpers shared by every layer: broadcasting, per-sample reductions, uint8 <-> [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample tensor ``x`` of shape (B,) broadcasts to ``ndim`` dims.

    Args:
        x: Tensor of shape (B,) or (B, ...).
        ndim: Number of dims of the tensor ``x`` must broadcast against.

    Returns:
        A view of ``x`` with shape (B, 1, ..., 1) and ``ndim`` dims.
    """
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than the target {ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dim except the first (per-sample reduction)."""
    return x.flatten(1).sum(1)


def mean_except_batch(x: Tensor) -> Tensor:
    """Average over every dim except the first (per-sample reduction)."""
    return x.flatten(1).mean(1)


def from_uint8(images: Tensor) -> Tensor:
    """Map uint8 images in [0, 255] to float32 in [-1, 1]: x / 127.5 - 1, the data module's scaling."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """Map images in [-1, 1] to uint8 in [0, 255] (round to nearest), the inverse of x / 127.5 - 1."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def quantized(images: Tensor) -> Tensor:
    """Images in [-1, 1] as they are written (rounded to uint8 levels), back in [-1, 1]: what a file of them holds."""
    return from_uint8(to_uint8(images))


def batch_time(t: float, x: Tensor) -> Tensor:
    """The time ``t`` as a (B,) tensor on ``x``'s device and dtype."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
