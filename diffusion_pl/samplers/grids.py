"""Time grids for samplers: which steps of the forward process a sampler visits."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.processes.sde import SDEProcess


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


TimeSpacing = Literal["uniform", "log_snr"]
TIME_SPACINGS: tuple[str, ...] = ("uniform", "log_snr")


def log_snr(process: SDEProcess, t: Tensor) -> Tensor:
    """lambda(t) = log(alpha(t)^2 / sigma(t)^2), strictly decreasing in t (Kingma et al. 2021, Sec. 3)."""
    return 2 * (process.alpha(t).log() - process.sigma(t).log())


def sde_times(process: SDEProcess, steps: int, spacing: TimeSpacing = "uniform") -> list[float]:
    """The ``steps`` + 1 decreasing times t_max = t_N > ... > t_0 = t_min a fixed-step SDE or ODE sampler visits.

    "uniform" takes equal steps in t (Song et al. 2021). "log_snr" takes equal steps in lambda(t) (the "logSNR"
    time steps of DPM-Solver, Lu et al. 2022, Sec. 3.3): a VP process changes fastest near t_min, where a
    uniform grid of few steps is too coarse. lambda is inverted by bisection in float64.

    Args:
        process: The SDE, which gives t_min, t_max and lambda(t).
        steps: Number of intervals N >= 1.
        spacing: "uniform" or "log_snr".

    Returns:
        N + 1 times, first t_max, last t_min.
    """
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
    if spacing not in TIME_SPACINGS:
        raise ValueError(f"unknown time spacing {spacing!r}; choose one of {', '.join(TIME_SPACINGS)}")
    t_max, t_min = process.t_max, process.t_min
    if spacing == "uniform":
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64).tolist()
    bounds = torch.tensor([t_max, t_min], dtype=torch.float64)
    start, end = log_snr(process, bounds).tolist()
    targets = torch.linspace(start, end, steps + 1, dtype=torch.float64)
    low, high = torch.full_like(targets, t_min), torch.full_like(targets, t_max)
    for _ in range(60):  # halves [t_min, t_max] to below float64 resolution
        middle = 0.5 * (low + high)
        later = log_snr(process, middle) < targets  # lambda decreases: the target time lies before middle
        high, low = torch.where(later, middle, high), torch.where(later, low, middle)
    times = (0.5 * (low + high)).tolist()
    times[0], times[-1] = t_max, t_min
    return times
