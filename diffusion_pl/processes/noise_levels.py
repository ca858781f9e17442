"""Noise levels of any forward process: its training time range, log-SNR lambda(t) = log(alpha^2 / sigma^2) (a
discrete process's continuous extension between integer steps), EDM's sigma~ = sigma / alpha = exp(-lambda / 2)
(Karras et al. 2022, Table 1), and the times at given noise levels (lambda inverted by bisection in float64).
Samplers build their grids from these; losses draw training noise levels with them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.discrete import DiscreteProcess
from diffusion_pl.processes.sde import SDEProcess

#: Relative slack when an explicit sigma is compared with the process's range (float rounding of its ends).
RANGE_SLACK = 1e-6


def time_range(process: ForwardProcess) -> tuple[float, float]:
    """(t_min, t_max), the times a net was trained on: steps 1..T of a discrete process, [eps, 1] of an SDE."""
    if isinstance(process, DiscreteProcess):
        return 1.0, float(process.num_steps)
    if isinstance(process, SDEProcess):
        return process.t_min, process.t_max
    raise ValueError(f"time grids are built on a DiscreteProcess or an SDEProcess, got {type(process).__name__}; "
                     "pass an explicit grid of times instead")


def process_log_snr(process: ForwardProcess, t: Tensor) -> Tensor:
    """lambda(t) = log(alpha^2 / sigma^2), the discrete process's own interpolation at non-integer t."""
    return process.log_snr(t) if isinstance(process, DiscreteProcess) else log_snr(process, t)  # type: ignore[arg-type]


def edm_sigma(process: ForwardProcess, t: Tensor) -> Tensor:
    """EDM's noise level sigma(t) / alpha(t) = exp(-lambda(t) / 2) (Karras et al. 2022, Table 1), in float64."""
    return (-0.5 * process_log_snr(process, t.double())).exp()


def sigma_range(process: ForwardProcess) -> tuple[float, float]:
    """(sigma_min, sigma_max): the EDM noise levels at the process's smallest and largest training times."""
    t_min, t_max = time_range(process)
    low, high = edm_sigma(process, torch.tensor([t_min, t_max], dtype=torch.float64)).tolist()
    return low, high


def reaches_zero_snr(process: ForwardProcess) -> bool:
    """Whether alpha(t) = 0 at one of the process's probe times (zero terminal SNR, Lin et al. 2024): lambda = -inf and
    sigma~ = inf there, so nothing that divides by alpha (eps-prediction's x0, EDM's x / alpha) is defined."""
    return bool((process.marginals()["alpha"] == 0).any())


def times_at_sigmas(process: ForwardProcess, sigmas: Tensor) -> Tensor:
    """The float64 times where the process's EDM sigma takes the (decreasing) values ``sigmas``.

    Raises ValueError for a sigma outside the process's range :func:`sigma_range`.
    """
    (t_min, t_max), (low, high) = time_range(process), sigma_range(process)
    outside = (sigmas < low * (1 - RANGE_SLACK)) | (sigmas > high * (1 + RANGE_SLACK))
    if bool(outside.any()):
        raise ValueError(f"noise level {float(sigmas[outside][0]):.6g} lies outside the process's range "
                         f"[{low:.6g}, {high:.6g}] of sigma / alpha; choose sigma_min and sigma_max within it")
    return invert_log_snr(lambda t: process_log_snr(process, t), -2 * sigmas.double().log(), t_min, t_max)


def log_snr(process: SDEProcess, t: Tensor) -> Tensor:
    """lambda(t) = log(alpha(t)^2 / sigma(t)^2), strictly decreasing in t (Kingma et al. 2021, Sec. 3)."""
    return 2 * (process.alpha(t).log() - process.sigma(t).log())


def invert_log_snr(lam: Callable[[Tensor], Tensor], targets: Tensor, t_min: float, t_max: float) -> Tensor:
    """The times in [t_min, t_max] where the strictly decreasing log-SNR ``lam`` takes the float64 ``targets``,
    by 60 bisections (which halve [t_min, t_max] to below float64 resolution)."""
    low, high = torch.full_like(targets, t_min), torch.full_like(targets, t_max)
    for _ in range(60):
        middle = 0.5 * (low + high)
        later = lam(middle) < targets  # lambda decreases: the target time lies before middle
        high, low = torch.where(later, middle, high), torch.where(later, low, middle)
    return 0.5 * (low + high)
