"""The forward-process abstraction: x_t = alpha(t) * x0 + sigma(t) * eps."""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from diffusion_pl.core.spec import Configurable
from diffusion_pl.core.tensors import append_dims, sum_except_batch


def marginals_mismatch(trained: dict[str, Tensor], used: dict[str, Tensor], atol: float = 1e-5) -> str | None:
    """How two :meth:`ForwardProcess.marginals` differ, in words, or None when they agree within ``atol``."""
    if trained["alpha"].shape != used["alpha"].shape:
        return f"{trained['alpha'].numel()} probe times against {used['alpha'].numel()}"
    for name in ("net_time", "alpha", "sigma"):
        gap = (trained[name] - used[name]).abs()
        tolerance = atol * max(1.0, float(used[name].abs().max()))
        if float(gap.max()) > tolerance:
            at = int(gap.argmax())
            return (f"{name} {float(trained[name][at]):.6g} against {float(used[name][at]):.6g} at network time "
                    f"{float(used['net_time'][at]):.6g}")
    return None


class ForwardProcess(Configurable, nn.Module, abc.ABC):
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

    @abc.abstractmethod
    def probe_times(self) -> Tensor:
        """Times spanning the process's time domain, at which :meth:`marginals` describes it."""

    def marginals(self) -> dict[str, Tensor]:
        """The network time, alpha(t) and sigma(t) at :meth:`probe_times` (float32, on the CPU).

        This is all a net trained on the process sees of it: x_t = alpha(t) x0 + sigma(t) eps at the time it
        embeds. Two processes with equal marginals give a net the same inputs, so a net trained on one (e.g. the
        noisy classifier of classifier guidance) is valid for the other.
        """
        t = self.probe_times()
        return {"net_time": self.net_input_time(t).float().cpu(), "alpha": self.alpha(t).float().cpu(),
                "sigma": self.sigma(t).float().cpu()}

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The kernel q(x_t | x_s) = N(a x_s, v I) for s < t: a = alpha(t) / alpha(s), v = sigma(t)^2 - a^2 sigma(s)^2.

        Valid for every Markov process with linear Gaussian steps and these marginals, since then
        x_t = a x_s + sqrt(v) z composes with x_s = alpha(s) x_0 + sigma(s) eps into the marginal at t. For DDPM,
        a = sqrt(alpha-bar_t / alpha-bar_s) and v = 1 - alpha-bar_t / alpha-bar_s (Ho et al. 2020, eq. 2 for
        s = t - 1: a = sqrt(1 - beta_t), v = beta_t); for the VP SDE v = 1 - a^2 is the beta_i of its DDPM
        discretization (Song et al. 2021, eq. 8); for VE, a = 1 and v = sigma(t)^2 - sigma(s)^2 (SMLD, eq. 9).

        Returns:
            (a, v), each of shape (B,).
        """
        a = self.alpha(t) / self.alpha(s)
        return a, self.sigma(t) ** 2 - a**2 * self.sigma(s) ** 2

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
