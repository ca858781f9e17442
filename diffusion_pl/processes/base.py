"""The forward-process abstraction: x_t = alpha(t) * x0 + sigma(t) * eps."""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from diffusion_pl.utils import append_dims, sum_except_batch


class ForwardProcess(nn.Module, abc.ABC):
    """A Gaussian forward (noising) process q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I).

    Subclasses define the time domain (integer steps for DDPM, continuous t for SDEs), the marginal
    coefficients and the training-time distribution of t. Everything downstream (losses,
    parameterizations, samplers) only talks to this interface.
    """

    @abc.abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal coefficient alpha(t) of the marginal q(x_t | x_0), shape (B,)."""

    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise standard deviation sigma(t) of the marginal q(x_t | x_0), shape (B,)."""

    @abc.abstractmethod
    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` training times from the process's training-time distribution."""

    @abc.abstractmethod
    def net_input_time(self, t: Tensor) -> Tensor:
        """The scalar the network embeds for time ``t`` (float tensor of shape (B,))."""

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_0) by reparameterization: x_t = alpha(t) x0 + sigma(t) eps (Ho et al. 2020, eq. 4)."""
        return append_dims(self.alpha(t), x0.ndim) * x0 + append_dims(self.sigma(t), x0.ndim) * noise

    def prior_sample(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        """Draw x_T from the prior p(x_T) = N(0, I)."""
        return torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z: Tensor) -> Tensor:
        """Per-sample log-density of the standard normal prior, summed over non-batch dims."""
        dim = z[0].numel()
        return -0.5 * dim * math.log(2 * math.pi) - 0.5 * sum_except_batch(z**2)
