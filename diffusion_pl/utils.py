"""Small tensor helpers shared by every layer, a file's SHA-256, and derived seeds."""

from __future__ import annotations

import hashlib
from pathlib import Path

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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def evaluation_seed(batch_idx: int, rank: int) -> int:
    """The seed of an evaluation batch's noise: the process rank in the upper 32 bits, the batch index in the lower,
    so that no two (rank, batch) pairs share a stream (``batch + 1000 * rank`` did once a rank had more than 1,000
    batches) and every evaluation draws the same noise."""
    if not (0 <= batch_idx < 1 << 32 and 0 <= rank < 1 << 31):
        raise ValueError(f"evaluation seeds take batch indices below 2^32 and ranks below 2^31, got {batch_idx}, {rank}")
    return (rank << 32) | batch_idx
