"""Continuous-time score SDEs (Song et al. 2021): VP, sub-VP and VE, with t in [eps, 1].

Every process here has an affine drift f(x, t) = f(t) x and a state-independent diffusion g(t), so its
perturbation kernel is Gaussian, x_t = alpha(t) x_0 + sigma(t) eps (Song et al. 2021, eq. 5 and App. B),
and the exact transition from s < t is x_t = a x_s + sqrt(v) z with a = alpha(t) / alpha(s) and
v = sigma(t)^2 - a^2 sigma(s)^2 (:meth:`SDEProcess.transition`). Samplers, likelihoods and losses only use
this interface; none of them dispatch on the process type.

Network time input: every process feeds the network 999 t (score_sde's convention for DDPM-style nets),
so the DDPM UNet's sinusoidal embedding sees the same range [0, 999] as for a discrete T = 1000 process.
For VE this is the affine map 999 (log sigma - log sigma_min) / log(sigma_max / sigma_min) of log sigma,
i.e. NCSN++'s log-sigma conditioning rescaled to the embedding's range.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims, sum_except_batch
from diffusion_pl.processes.base import ForwardProcess

NET_TIME_SCALE = 999.0


class SDEProcess(ForwardProcess):
    """A forward SDE dx = f(x, t) dt + g(t) dw on t in [t_min, t_max] = [eps, 1] (Song et al. 2021, eq. 5).

    Args:
        eps: t_min, the smallest time used in training and sampling (the score is unbounded at t = 0).
    """

    def __init__(self, eps: float) -> None:
        super().__init__()
        if not 0.0 < eps < 1.0:
            raise ValueError(f"the SDE's smallest time eps must lie in (0, 1), got {eps}")
        self.t_min = float(eps)
        self.t_max = 1.0

    @abc.abstractmethod
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift f(x, t) (shape of ``x``) and diffusion g(t) (shape (B,)) of the forward SDE."""

    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U(eps, 1), the training-time distribution of Song et al. 2021 (eq. 7)."""
        u = torch.rand(n, device=device, generator=generator)
        return self.t_min + (self.t_max - self.t_min) * u

    def net_input_time(self, t: Tensor) -> Tensor:
        """999 t: the DDPM embedding's range (see the module docstring)."""
        return NET_TIME_SCALE * t

    def probe_times(self) -> Tensor:
        """101 equally spaced times in [eps, 1]."""
        return torch.linspace(self.t_min, self.t_max, 101, dtype=torch.float64).float()

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Drift f - g^2 score of the reverse-time SDE (Song et al. 2021, eq. 6)."""
        drift, diffusion = self.sde(x, t)
        return drift - append_dims(diffusion**2, x.ndim) * score

    def ode_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Drift f - g^2 score / 2 of the probability-flow ODE (Song et al. 2021, eq. 13)."""
        drift, diffusion = self.sde(x, t)
        return drift - 0.5 * append_dims(diffusion**2, x.ndim) * score


class _LinearBetaSDE(SDEProcess):
    """Shared beta(t) = beta_min + t (beta_max - beta_min) of the VP and sub-VP SDEs (Song et al. 2021, App. B)."""

    def __init__(self, beta_min: float, beta_max: float, eps: float) -> None:
        super().__init__(eps)
        if not 0.0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha(t) = -1/2 int_0^t beta = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = exp(-1/2 int_0^t beta(s) ds) (Song et al. 2021, eq. 33)."""
        return self.log_alpha(t).exp()


class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw (Song et al. 2021, eq. 11).

    The continuous limit of DDPM with beta_i = beta(i / T) / T; the defaults match the linear DDPM schedule
    (beta_1 = 1e-4, beta_T = 0.02 at T = 1000). Prior N(0, I).

    Args:
        beta_min: beta(0).
        beta_max: beta(1).
        eps: Smallest time t_min.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5) -> None:
        super().__init__(beta_min, beta_max, eps)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sqrt(1 - alpha(t)^2), via expm1 so that it stays accurate at t near eps."""
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f = -beta(t) x / 2, g = sqrt(beta(t)) (Song et al. 2021, eq. 11)."""
        beta = self.beta(t)
        return -0.5 * append_dims(beta, x.ndim) * x, beta.sqrt()


class SubVPSDE(_LinearBetaSDE):
    """Sub-VP SDE dx = -beta x / 2 dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw (Song et al. 2021, eq. 29).

    Its perturbation kernel has alpha(t) as for VP and sigma(t) = 1 - alpha(t)^2 (a standard deviation, not
    its square; Song et al. 2021, App. B), whose square is below VP's variance. Prior N(0, I).

    Args:
        beta_min: beta(0).
        beta_max: beta(1).
        eps: Smallest time t_min (score_sde uses 1e-3 for sub-VP).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3) -> None:
        super().__init__(beta_min, beta_max, eps)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = 1 - alpha(t)^2 = 1 - exp(-int_0^t beta)."""
        return -torch.expm1(2 * self.log_alpha(t))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f = -beta(t) x / 2, g^2 = beta(t) (1 - alpha(t)^4), since exp(-2 int_0^t beta) = alpha^4."""
        beta = self.beta(t)
        return -0.5 * append_dims(beta, x.ndim) * x, (beta * -torch.expm1(4 * self.log_alpha(t))).sqrt()


class VESDE(SDEProcess):
    """Variance-exploding SDE dx = sqrt(d sigma^2 / dt) dw (Song et al. 2021, eq. 9 and eq. 30).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1, f = 0 and
    g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)). Prior N(0, sigma_max^2 I).

    sigma(0) = sigma_min > 0: as in score_sde, the marginal x_t = x_0 + sigma(t) eps holds with x(0) taken to
    be the data perturbed by N(0, sigma_min^2 I) (the SDE alone, started from clean data, would give the
    variance sigma(t)^2 - sigma_min^2). Training, :meth:`transition` and the likelihood all use this
    convention; samplers end with a Tweedie denoising step at t_min that removes the residual sigma(t_min).

    Args:
        sigma_min: sigma(0).
        sigma_max: sigma(1), the prior's standard deviation (choose it near the largest data distance).
        eps: Smallest time t_min.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5) -> None:
        super().__init__(eps)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        """alpha = 1: the VE SDE has no drift."""
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, App. C)."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)) = sqrt(d sigma(t)^2 / dt)."""
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * self.log_ratio)

    def prior_sample(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        """Draw x_1 from the prior N(0, sigma_max^2 I)."""
        return self.sigma_max * torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z: Tensor) -> Tensor:
        """Per-sample log N(z; 0, sigma_max^2 I), summed over non-batch dims."""
        dim = z[0].numel()
        return (-0.5 * dim * math.log(2 * math.pi * self.sigma_max**2)
                - 0.5 * sum_except_batch(z**2) / self.sigma_max**2)
