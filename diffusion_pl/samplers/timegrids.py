"""Time grids as parts: ``Karras()``, ``Uniform()``, ``Trailing()``, ``LogSNR()`` each give the decreasing times of
an N-step sampler on any forward process (``grid.times(process, N)``), e.g. in YAML
``sampler: {class_path: diffusion_pl.samplers.Heun, init_args: {steps: 18, spacing: {class_path:
diffusion_pl.samplers.Karras, init_args: {rho: 7}}}}``.

A grid is N noise levels from the process's largest to its smallest, then the time 0 (the data): N + 1 float64
times t_0 > ... > t_{N-1} > t_N = 0. Noise levels are EDM's sigma = sigma(t) / alpha(t) = exp(-lambda(t) / 2)
(Karras et al. 2022, Sec. 4: every Gaussian process is a rescaled x = x0 + sigma n), with lambda the log-SNR.
A sigma is mapped to its time by inverting lambda by bisection: for an SDE its closed form, for a
:class:`DiscreteProcess` its continuous extension :meth:`DiscreteProcess.log_snr` (linear in log-SNR between
integer steps), so that a discrete process is sampled at non-integer times.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from diffusion_pl.core.spec import Configurable
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.discrete import DiscreteProcess
from diffusion_pl.processes.noise_levels import (
    sigma_range,
    time_range,
    times_at_sigmas,
)
from diffusion_pl.samplers.grids import append_zero, check_steps

#: The default largest noise level of :class:`Karras` grids when the process reaches higher (EDM, Karras et al. 2022,
#: Sec. 5: sigma_max = 80). A cosine DDPM reaches sigma~ ~ 2e4 at T: starting there, 5-10 step Heun and DPM-Solver++
#: grids spend their first steps where nothing is left to denoise, and their samples were noise (demo model).
EDM_SIGMA_MAX = 80.0
class TimeGrid(Configurable, abc.ABC):
    """How an N-step sampler spaces its times on a process; :meth:`times` builds them."""

    def __init__(self) -> None:
        """A grid without options (subclasses with options take them here)."""

    def times(self, process: ForwardProcess, steps: int) -> Tensor:
        """N = ``steps`` decreasing times from the process's largest training time down, then 0 (float64, N + 1).

        Raises ValueError on a process without a time range (neither discrete nor an SDE) or for steps < 1.
        """
        check_steps(steps)
        time_range(process)
        return append_zero(self._levels(process, steps))

    @abc.abstractmethod
    def _levels(self, process: ForwardProcess, steps: int) -> Tensor:
        """The N decreasing float64 times before the final 0."""

    def options(self) -> dict[str, float | None]:
        """The grid's arguments by name: its public attributes."""
        return {name: value for name, value in vars(self).items() if not name.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options() == other.options()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.options().items())))


class Karras(TimeGrid):
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for i < N (sigma_max alone for N = 1), at the times :func:`times_at_sigmas`.

    rho = 7 crowds the steps near sigma_min, where the ODE's curvature lies; rho = 1 is uniform in sigma, and
    rho -> inf tends to :class:`LogSNR`.

    Args:
        rho: The exponent (> 0).
        sigma_min: The smallest noise level sigma / alpha; None: the process's own, at its smallest training time
            (EDM uses 0.002 on its VE-like processes).
        sigma_max: The largest (finite); None: the process's own at its largest training time, at most
            :data:`EDM_SIGMA_MAX` (80, EDM's); the prior noise then stands for that level (its data part, alpha x0,
            is below 1.3% of the noise there). On a zero-terminal-SNR process, whose largest is infinite, the grid
            thus starts at 80, below T; a :class:`Trailing` or :class:`Uniform` grid starts at T itself.
    """

    def __init__(self, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        if rho <= 0:
            raise ValueError(f"Karras rho must be positive, got {rho}")
        if sigma_min is not None and sigma_min <= 0:
            raise ValueError(f"Karras sigma_min must be positive, got {sigma_min}")
        if sigma_max is not None and not math.isfinite(sigma_max):
            raise ValueError(f"Karras sigma_max must be finite, got {sigma_max}; leave it null for min(80, the "
                             "process's largest)")
        if sigma_min is not None and sigma_max is not None and sigma_max <= sigma_min:
            raise ValueError(f"Karras needs sigma_max > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.rho = rho
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sigmas(self, process: ForwardProcess, steps: int) -> Tensor:
        """The N noise levels of eq. 5 (float64)."""
        low, high = sigma_range(process)
        low = low if self.sigma_min is None else self.sigma_min
        high = min(high, EDM_SIGMA_MAX) if self.sigma_max is None else self.sigma_max
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
        inv_rho = 1.0 / self.rho
        return (high**inv_rho + ramp * (low**inv_rho - high**inv_rho)) ** self.rho

    def _levels(self, process: ForwardProcess, steps: int) -> Tensor:
        times = times_at_sigmas(process, self.sigmas(process, steps))
        t_min, t_max = time_range(process)
        if self.sigma_max is None and sigma_range(process)[1] <= EDM_SIGMA_MAX:
            times[0] = t_max
        if self.sigma_min is None and steps > 1:
            times[-1] = t_min
        return times


class Uniform(TimeGrid):
    """N times equally spaced in t from the largest training time to the smallest: t_max, ..., t_min (Song et
    al. 2021's grid; diffusers' "linspace" spacing on a discrete process, there at non-integer steps)."""

    def _levels(self, process: ForwardProcess, steps: int) -> Tensor:
        t_min, t_max = time_range(process)
        return torch.linspace(t_max, t_min, steps, dtype=torch.float64)


class Trailing(TimeGrid):
    """Lin et al. 2024, Table 2 ("trailing"): t_i = T (1 - i / N), i < N, starting exactly at T, so that the
    first step sees the prior's noise level (a "leading" grid such as DDIM's 1 + i T / N never does; on a
    zero-terminal-SNR process that level is pure noise, x_T = eps, and the prior is exact); on a
    discrete process rounded to integer steps (N <= T), which is DDIM's strided grid."""

    def _levels(self, process: ForwardProcess, steps: int) -> Tensor:
        _, t_max = time_range(process)
        times = t_max * (1 - torch.arange(steps, dtype=torch.float64) / steps)
        if isinstance(process, DiscreteProcess):
            if steps > process.num_steps:
                raise ValueError(f"Trailing rounds to integer steps: at most the process's T={process.num_steps} "
                                 f"steps, got {steps}; use Karras, Uniform or LogSNR for more")
            times = times.round()
        return times


class LogSNR(TimeGrid):
    """N times equally spaced in log-SNR lambda from the largest training time to the smallest (the "logSNR"
    steps of DPM-Solver, Lu et al. 2022, Sec. 3.3; equal steps h in DPM-Solver++'s lambda = -log sigma).

    Refuses a zero-terminal-SNR process (lambda_T = -inf: no equal steps reach it)."""

    def _levels(self, process: ForwardProcess, steps: int) -> Tensor:
        low, high = sigma_range(process)
        if not math.isfinite(high):
            raise ValueError("LogSNR spaces its steps equally in log-SNR from the process's largest noise level, which "
                             "is infinite on a zero-terminal-SNR process (alpha-bar_T = 0); use spacing: Trailing (it "
                             "starts at T, from pure noise) or Karras (it starts at sigma_max = 80)")
        sigmas = torch.logspace(math.log10(high), math.log10(low), steps, dtype=torch.float64)
        times = times_at_sigmas(process, sigmas.clamp(low, high))
        t_min, t_max = time_range(process)
        times[0] = t_max
        if steps > 1:
            times[-1] = t_min
        return times
