"""What a denoiser predicts, and conversions between eps, x0, v and the score.

For x_t = alpha x0 + sigma eps (any ForwardProcess):
  eps-prediction:  x0 = (x_t - sigma eps) / alpha                          (Ho et al. 2020, eq. 15)
  x0-prediction:   eps = (x_t - alpha x0) / sigma
  score:           grad log q(x_t) = -E[eps | x_t] / sigma                 (Song et al. 2021, eq. 16 / Tweedie)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.ode import ODEFn
from diffusion_pl.processes.sde import SDEProcess

log = logging.getLogger(__name__)
#: The largest 1 / alpha(t) that an unclipped eps-prediction model samples through without a warning.
UNCLIPPED_EPS_LIMIT = 20.0


@dataclass
class Prediction:
    """A denoiser's output, in both the x0 and eps parameterizations.

    Attributes:
        x0: Predicted clean data E[x0 | x_t].
        eps: Predicted noise E[eps | x_t].
        log_var: Learned per-element reverse log-variance (improved DDPM); None means fixed variance.
        raw: The network's raw output (before conversion), used by losses on the native target.
    """

    x0: Tensor
    eps: Tensor
    log_var: Tensor | None = None
    raw: Tensor | None = None


DenoiseFn = Callable[[Tensor, Tensor], Prediction]
#: (x_t, t, **cond) -> Prediction: a denoiser whose bound conditioning a caller may replace (batched CFG does).
ConditionalDenoiseFn = Callable[..., Prediction]


def coefficients(process: ForwardProcess, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    """(alpha(t), sigma(t)), each broadcastable against ``ndim``-dim tensors."""
    return append_dims(process.alpha(t), ndim), append_dims(process.sigma(t), ndim)


def eps_from_x0(x0: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """eps = (x_t - alpha x0) / sigma: the noise consistent with a given x0 estimate."""
    alpha, sigma = coefficients(process, t, x_t.ndim)
    return (x_t - alpha * x0) / sigma


def x0_from_eps(eps: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha: the data estimate consistent with a given eps estimate."""
    alpha, sigma = coefficients(process, t, x_t.ndim)
    return (x_t - sigma * eps) / alpha


def x0_from_guided_eps(eps: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess,
                       at_pure_noise: Tensor) -> Tensor:
    """:func:`x0_from_eps` of a guided eps, and ``at_pure_noise`` where alpha(t) = 0 (the T of a zero-terminal-SNR
    process, Lin et al. 2024): there x_t = eps carries nothing of x0, so no eps says which x0 the guidance wants."""
    alpha = append_dims(process.alpha(t), x_t.ndim)
    return torch.where(alpha == 0, at_pure_noise, x0_from_eps(eps, x_t, t, process))


def score_from_eps(eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """grad_x log q_t(x) = -eps / sigma(t) (Song et al. 2021; Tweedie's formula)."""
    return -eps / append_dims(process.sigma(t), eps.ndim)


def clip_denoised(denoise: DenoiseFn, process: ForwardProcess, low: float = -1.0, high: float = 1.0) -> DenoiseFn:
    """Clamp the predicted x0 to the data range and recompute eps from it (Ho et al. 2020's released sampler)."""

    def clipped(x_t: Tensor, t: Tensor) -> Prediction:
        pred = denoise(x_t, t)
        x0 = pred.x0.clamp(low, high)
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process), log_var=pred.log_var, raw=pred.raw)

    return clipped


def warn_unclipped_eps(process: ForwardProcess) -> None:
    """Warn when an eps-predicting model whose x0 is not clipped (latent diffusion) runs on a process whose alpha(t)
    nearly vanishes: the sampler's x0 = (x_t - sigma eps) / alpha multiplies the net's eps error by 1 / alpha(T)
    (about 600 for the cosine schedule at T = 1000), and samples diverge; pixel models hide it by clipping x0."""
    worst = 1.0 / float(process.marginals()["alpha"].min())
    if worst > UNCLIPPED_EPS_LIMIT:
        log.warning("eps-prediction without x0 clipping: x0 = (x_t - sigma eps) / alpha amplifies the net's error up to "
                    "%.0fx at the largest times, so sampled latents can diverge; use prediction: v (or x0), or a "
                    "schedule whose alpha stays larger (e.g. LDM's linear 0.00085-0.012)", worst)


def probability_flow(denoise: DenoiseFn, process: SDEProcess) -> ODEFn:
    """dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 with score = -eps_hat / sigma (Song et al. 2021, eq. 13)."""

    def drift(x: Tensor, t: Tensor) -> Tensor:
        return process.ode_drift(x, t, score_from_eps(denoise(x, t).eps, t, process))

    return drift
