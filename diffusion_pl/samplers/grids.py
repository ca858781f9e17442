"""Time grids for samplers: the decreasing times a sampler visits, as a 1-D tensor.

A grid t_0 > t_1 > ... > t_end is walked in consecutive pairs (t_i, t_{i+1}); its last entry is where the sample
lands. Discrete processes use long tensors of integer steps, SDEs float64 tensors of times (float64 keeps the
exact Python floats a grid was built from: ``grid.tolist()`` gives them back).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.processes.noise_levels import invert_log_snr, log_snr
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


def append_zero(grid: Tensor) -> Tensor:
    """``grid`` followed by 0 (same dtype): a sampler walking it lands on the data, t = 0."""
    return torch.cat([grid, grid.new_zeros(1)])


def strided_grid(num_steps: int, steps: int) -> Tensor:
    """DDIM's grid on a discrete process: tau_S = T > ... > tau_1 > 0 (:func:`strided_steps` reversed, then 0)."""
    return append_zero(strided_steps(num_steps, steps).flip(0))


def ddpm_grid(num_steps: int, start: int | None = None) -> Tensor:
    """The ancestral chain's steps t_0, t_0 - 1, ..., 1 (Ho et al. 2020, Alg. 2), t_0 = ``start`` or T."""
    start = num_steps if start is None else start
    if not 1 <= start <= num_steps:
        raise ValueError(f"the DDPM chain starts at a step between 1 and T={num_steps}, got {start}")
    return torch.arange(start, 0, -1)


TimeSpacing = Literal["uniform", "log_snr"]
TIME_SPACINGS: tuple[str, ...] = ("uniform", "log_snr")


def sde_times(process: SDEProcess, steps: int, spacing: TimeSpacing = "uniform") -> Tensor:
    """The ``steps`` + 1 decreasing times t_max = t_N > ... > t_0 = t_min a fixed-step SDE or ODE sampler visits.

    "uniform" takes equal steps in t (Song et al. 2021). "log_snr" takes equal steps in lambda(t) (the "logSNR"
    time steps of DPM-Solver, Lu et al. 2022, Sec. 3.3): a VP process changes fastest near t_min, where a
    uniform grid of few steps is too coarse. lambda is inverted by bisection in float64.

    Args:
        process: The SDE, which gives t_min, t_max and lambda(t).
        steps: Number of intervals N >= 1.
        spacing: "uniform" or "log_snr".

    Returns:
        Float64 tensor of N + 1 times, first exactly t_max, last exactly t_min.
    """
    check_steps(steps)
    check_spacing(spacing)
    t_max, t_min = process.t_max, process.t_min
    if spacing == "uniform":
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    bounds = torch.tensor([t_max, t_min], dtype=torch.float64)
    start, end = log_snr(process, bounds).tolist()
    targets = torch.linspace(start, end, steps + 1, dtype=torch.float64)
    times = invert_log_snr(lambda t: log_snr(process, t), targets, t_min, t_max)
    times[0], times[-1] = t_max, t_min
    return times


def check_steps(steps: int) -> None:
    """Raise unless ``steps`` is a positive number of sampling steps."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")


def check_spacing(spacing: str) -> None:
    """Raise unless ``spacing`` is one of :data:`TIME_SPACINGS`."""
    if spacing not in TIME_SPACINGS:
        raise ValueError(f"unknown time spacing {spacing!r}; choose one of {', '.join(TIME_SPACINGS)}")


def grid_times(grid: Tensor, sampler: str) -> list[float]:
    """The entries of a strictly decreasing 1-D grid of at least two non-negative times, as Python numbers (ints
    for an integer grid, the exact floats of a float grid); ``sampler`` names the caller in the error."""
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"{sampler} needs a 1-D grid of at least two times (start, ..., end), "
                         f"got shape {tuple(grid.shape)}")
    times = grid.tolist()
    if any(later >= earlier for earlier, later in zip(times, times[1:])) or times[-1] < 0:
        raise ValueError(f"{sampler} needs a strictly decreasing grid of times >= 0 (e.g. from the sampler "
                         f"config's grid(process)), got {_shorten(times)}")
    return times


def grid_pairs(grid: Tensor, sampler: str) -> list[tuple[float, float]]:
    """The consecutive pairs (t_i, t_{i+1}) of :func:`grid_times`: the steps a sampler takes."""
    times = grid_times(grid, sampler)
    return list(zip(times[:-1], times[1:]))


def _shorten(times: list) -> str:
    """The first and last entries of a long list, for error messages."""
    return str(times) if len(times) <= 8 else f"[{', '.join(map(str, times[:4]))}, ..., {times[-1]}]"
