"""The parts of a denoising loss: where its training times come from and how each time's error is weighted.

A :class:`TimeDistribution` draws training times on any process; a :class:`Weighting` gives lambda(t), the weight
of the squared x0 error at time t, which the loss carries to the network's own target through the
parameterization (:meth:`~diffusion_pl.parameterization.Parameterization.x0_error_scale`).
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from diffusion_pl.core.spec import Configurable
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.noise_levels import edm_sigma, sigma_range, time_range, times_at_sigmas


class TimeDistribution(Configurable, abc.ABC):
    """A distribution of training times on a process."""

    @abc.abstractmethod
    def sample(self, process: ForwardProcess, n: int, device: torch.device | str,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` training times (B,) of ``process`` on ``device``."""


class LogNormalSigma(TimeDistribution):
    """EDM's training noise levels: ln sigma~ ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1, "Ours"), mapped to
    the process's times through sigma~(t) = sigma(t) / alpha(t) and clamped to the process's range.

    Args:
        p_mean: Mean of ln sigma~ (EDM: -1.2).
        p_std: Standard deviation of ln sigma~ (EDM: 1.2).
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        if not p_std > 0:
            raise ValueError(f"LogNormalSigma needs p_std > 0, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(self, process: ForwardProcess, n: int, device: torch.device | str,
               generator: torch.Generator | None = None) -> Tensor:
        low, high = sigma_range(process)
        normal = torch.randn(n, generator=generator, device=device).double()
        sigmas = (self.p_mean + self.p_std * normal).exp().clamp(low, high)
        return times_at_sigmas(process, sigmas).float()


class LogitNormal(TimeDistribution):
    """Logit-normal times: t = t_min + (t_max - t_min) sigmoid(u), u ~ N(mean, std^2) (Esser et al. 2024, Sec. 3.1,
    eq. 19: "lognorm(0, 1)" for rectified flow), which puts more weight on the middle of the time range.

    Args:
        mean: Location m of u.
        std: Scale s of u.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not std > 0:
            raise ValueError(f"LogitNormal needs std > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def sample(self, process: ForwardProcess, n: int, device: torch.device | str,
               generator: torch.Generator | None = None) -> Tensor:
        t_min, t_max = time_range(process)
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))
        return t_min + (t_max - t_min) * u


class Weighting(Configurable, abc.ABC):
    """lambda(t), the weight of the squared error of the x0 estimate at time t."""

    @abc.abstractmethod
    def x0_weight(self, t: Tensor, process: ForwardProcess) -> Tensor:
        """lambda(t), (B,)."""


class MinSNR(Weighting):
    """lambda(t) = min(SNR(t), gamma), SNR = alpha^2 / sigma^2 (Hang et al. 2023, eq. 9): eps-prediction's
    min(SNR, gamma) / SNR, x0's min(SNR, gamma), v's min(SNR, gamma) / (SNR + 1) on a VP process.

    Args:
        gamma: The clamp (the paper's 5).
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"MinSNR needs gamma > 0, got {gamma}")
        self.gamma = float(gamma)

    def x0_weight(self, t: Tensor, process: ForwardProcess) -> Tensor:
        return ((process.alpha(t) / process.sigma(t)) ** 2).clamp(max=self.gamma)


class EDMWeighting(Weighting):
    """lambda(sigma~) = (sigma~^2 + sigma_data^2) / (sigma~ sigma_data)^2 (Karras et al. 2022, Table 1), the weight
    that gives EDM's preconditioned F a unit weight: lambda c_out^2 = 1.

    Args:
        sigma_data: The data's standard deviation (0.5 for images in [-1, 1]).
    """

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"EDMWeighting needs sigma_data > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def x0_weight(self, t: Tensor, process: ForwardProcess) -> Tensor:
        sigma = edm_sigma(process, t).to(t.dtype if t.is_floating_point() else torch.float32)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return torch.where(sigma.isinf(), 1 / self.sigma_data**2, weight)  # its limit at alpha = 0 (zero terminal SNR)
