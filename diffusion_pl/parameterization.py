"""What the network predicts, and conversions between eps, x0, v and the score.

For x_t = alpha x0 + sigma eps (any ForwardProcess):
  eps-prediction:  x0 = (x_t - sigma eps) / alpha                          (Ho et al. 2020, eq. 15)
  x0-prediction:   eps = (x_t - alpha x0) / sigma
  v-prediction:    v = alpha eps - sigma x0, so x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
                   and eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)  (Salimans & Ho 2022, App. D)
  score:           grad log q(x_t) = -E[eps | x_t] / sigma                 (Song et al. 2021, eq. 16 / Tweedie)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import Tensor, nn

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.ode import ODEFn
from diffusion_pl.processes.sde import SDEProcess

log = logging.getLogger(__name__)
#: The largest 1 / alpha(t) that an unclipped eps-prediction model samples through without a warning.
UNCLIPPED_EPS_LIMIT = 20.0

PredictionKind = Literal["eps", "x0", "v"]
PREDICTION_KINDS: tuple[str, ...] = ("eps", "x0", "v")


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


def _coefs(process: ForwardProcess, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    return append_dims(process.alpha(t), ndim), append_dims(process.sigma(t), ndim)


def prediction_from_output(kind: PredictionKind, output: Tensor, x_t: Tensor, t: Tensor,
                           process: ForwardProcess) -> Prediction:
    """Convert a network output of the given ``kind`` into a :class:`Prediction` (see module docstring)."""
    alpha, sigma = _coefs(process, t, x_t.ndim)
    if kind == "eps":
        return Prediction(x0=(x_t - sigma * output) / alpha, eps=output, raw=output)
    if kind == "x0":
        return Prediction(x0=output, eps=(x_t - alpha * output) / sigma, raw=output)
    if kind == "v":
        norm = alpha**2 + sigma**2
        return Prediction(x0=(alpha * x_t - sigma * output) / norm, eps=(sigma * x_t + alpha * output) / norm,
                          raw=output)
    raise ValueError(f"unknown prediction kind {kind!r}; choose one of {', '.join(PREDICTION_KINDS)}")


def target_for(kind: PredictionKind, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """The regression target of a network that predicts ``kind`` (eps, x0, or v = alpha eps - sigma x0)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        alpha, sigma = _coefs(process, t, x0.ndim)
        return alpha * eps - sigma * x0
    raise ValueError(f"unknown prediction kind {kind!r}; choose one of {', '.join(PREDICTION_KINDS)}")


def eps_from_x0(x0: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """eps = (x_t - alpha x0) / sigma: the noise consistent with a given x0 estimate."""
    alpha, sigma = _coefs(process, t, x_t.ndim)
    return (x_t - alpha * x0) / sigma


def x0_from_eps(eps: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha: the data estimate consistent with a given eps estimate."""
    alpha, sigma = _coefs(process, t, x_t.ndim)
    return (x_t - sigma * eps) / alpha


def score_from_eps(eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """grad_x log q_t(x) = -eps / sigma(t) (Song et al. 2021; Tweedie's formula)."""
    return -eps / append_dims(process.sigma(t), eps.ndim)


class Denoiser(nn.Module):
    """Wrap a network so that ``denoiser(x_t, t, **cond)`` returns a :class:`Prediction`.

    With ``learned_variance`` the network outputs twice the image channels: the prediction, then v in
    [-1, 1] mapped to the interpolation weight (v + 1) / 2 between log beta_t and log beta-tilde_t
    (Nichol & Dhariwal 2021, eq. 15; the process must provide ``interpolated_log_variance``).

    Args:
        net: Network called as ``net(x_t, net_input_time(t), **cond)``.
        process: The forward process the network was trained on (or a respaced version of it).
        kind: What the network predicts: "eps", "x0" or "v".
        learned_variance: Whether the network also outputs the reverse-variance interpolation.
    """

    def __init__(self, net: nn.Module, process: ForwardProcess, kind: PredictionKind = "eps",
                 learned_variance: bool = False) -> None:
        super().__init__()
        if kind not in PREDICTION_KINDS:
            raise ValueError(f"unknown prediction kind {kind!r}; choose one of {', '.join(PREDICTION_KINDS)}")
        if learned_variance and not hasattr(process, "interpolated_log_variance"):
            raise ValueError(f"learned variance needs a discrete (DDPM) process; {type(process).__name__} has no "
                             "beta_t / beta-tilde_t to interpolate between")
        self.net = net
        self.process = process
        self.kind = kind
        self.learned_variance = learned_variance

    def forward(self, x_t: Tensor, t: Tensor, **cond: Any) -> Prediction:
        output = self.net(x_t, self.process.net_input_time(t), **cond)
        if not self.learned_variance:
            return prediction_from_output(self.kind, output, x_t, t, self.process)
        if output.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(f"a learned-variance net must output 2 x {x_t.shape[1]} channels, got "
                             f"{output.shape[1]}: set the net's learn_sigma: true")
        mean_output, v = output.chunk(2, dim=1)
        pred = prediction_from_output(self.kind, mean_output, x_t, t, self.process)
        pred.log_var = self.process.interpolated_log_variance((v + 1) / 2, t)
        return pred

    def with_process(self, process: ForwardProcess) -> Denoiser:
        """The same network under another process, e.g. a respaced sub-sequence of this one."""
        return Denoiser(self.net, process, self.kind, self.learned_variance)

    def bind(self, **cond: Any) -> ConditionalDenoiseFn:
        """A :data:`DenoiseFn` with conditioning (labels, low-res images, ...) fixed in a closure; called with
        keyword arguments, those replace the bound ones (classifier-free guidance passes cond and null at once)."""
        return lambda x_t, t, **override: self(x_t, t, **(override or cond))


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
