"""Time grids for samplers: which steps of the forward process a sampler visits."""

from __future__ import annotations

import torch
from torch import Tensor


def strided_steps(num_steps: int, steps: int) -> Tensor:
    """An increasing sub-sequence tau_1 < ... < tau_S = T of {1..T} with S = ``steps`` evenly spaced
    entries, tau_i = round(i T / S) (Song et al. 2021a, DDIM Sec. 4.2 / App. C.2).

    Args:
        num_steps: T, the number of steps of the discrete forward process.
        steps: S, the number of sampling steps (1 <= S <= T).

    Returns:
        Long tensor of shape (S,).
    """
    if not 1 <= steps <= num_steps:
        raise ValueError(f"the number of sampling steps must be between 1 and T={num_steps}, got {steps}")
    grid = torch.round(torch.arange(1, steps + 1, dtype=torch.float64) * num_steps / steps).long()
    return grid
