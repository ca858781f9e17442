"""Parameterizations: what the network outputs, how that becomes a :class:`Prediction`, and what it is trained on.

For x_t = alpha x0 + sigma eps (any ForwardProcess), with sigma~ = sigma / alpha and x~ = x_t / alpha its EDM form
(Karras et al. 2022, eq. 4 and Table 1):
  Eps        F = eps                      x0 = (x_t - sigma F) / alpha                      (Ho et al. 2020, eq. 15)
  X0         F = x0
  V          F = alpha eps - sigma x0     x0 = (alpha x_t - sigma F) / (alpha^2 + sigma^2)  (Salimans & Ho 2022, App. D)
  Velocity   F = eps - x0                 x0 = (x_t - sigma F) / (alpha + sigma)   (rectified flow, Liu et al. 2023)
  EDM        D = c_skip x~ + c_out F(c_in x~; c_noise)                                   (Karras et al. 2022, eq. 7)
Each also says how an error in F shows in x0 (:meth:`Parameterization.x0_error_scale`), so a loss weighting
written for the x0 error is carried to the network's own target.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from diffusion_pl.core.errors import ConfigError
from diffusion_pl.core.spec import Configurable
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization.prediction import Prediction, coefficients
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.noise_levels import reaches_zero_snr

#: The prediction strings of earlier configs and checkpoints (``prediction: eps``), mapped to their parts.
PREDICTION_KINDS: tuple[str, ...] = ("eps", "x0", "v")


class Parameterization(Configurable, abc.ABC):
    """How the network's output F becomes a :class:`Prediction`, and F's regression target."""

    #: The network outputs this many times the image channels.
    output_factor = 1
    #: Whether x0 = (x_t - sigma F) / alpha: the network's error grows like 1 / alpha(t) in x0 (eps-prediction).
    divides_by_alpha = False

    def __init__(self) -> None:
        """A parameterization without options (subclasses with options take them here)."""

    def check(self, process: ForwardProcess) -> None:
        """Raise ValueError if this parameterization cannot serve ``process``."""

    def net_input(self, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        """What the network sees of x_t (EDM's c_in scaling; x_t itself here)."""
        return x_t

    def net_time(self, t: Tensor, process: ForwardProcess) -> Tensor:
        """The scalar the network embeds for time t (EDM's c_noise; the process's own here)."""
        return process.net_input_time(t)

    @abc.abstractmethod
    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Prediction:
        """The x0 and eps estimates of the network output ``output`` at (x_t, t)."""

    @abc.abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        """The output a perfect network gives at x_t = alpha(t) x0 + sigma(t) eps."""

    @abc.abstractmethod
    def x0_error_scale(self, t: Tensor, process: ForwardProcess) -> Tensor:
        """f(t), (B,): an output error delta gives the x0 error f(t) delta (at fixed x_t)."""


def refuse_zero_snr(process: ForwardProcess, name: str, why: str) -> None:
    """Raise ConfigError when ``process`` reaches alpha(t) = 0 (zero terminal SNR), where parameterization ``name`` is
    undefined for the reason ``why``; the message names the fix (Lin et al. 2024, Sec. 3.2: v-prediction)."""
    if reaches_zero_snr(process):
        raise ConfigError(f"{name} is undefined on a process with zero terminal SNR (alpha-bar_T = 0): {why}. Train "
                          "with parameterization: {class_path: diffusion_pl.parameterization.V} (Lin et al. 2024, "
                          "Sec. 3.2), or set the process's zero_terminal_snr: false")


def _from_x0(x0: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess, output: Tensor) -> Prediction:
    alpha, sigma = coefficients(process, t, x_t.ndim)
    return Prediction(x0=x0, eps=(x_t - alpha * x0) / sigma, raw=output)


class Eps(Parameterization):
    """The network predicts the noise eps (Ho et al. 2020)."""

    divides_by_alpha = True

    def check(self, process: ForwardProcess) -> None:
        """Refuse a zero-terminal-SNR process: at alpha(T) = 0, x_T = eps whatever x0, so x0 is not recoverable."""
        refuse_zero_snr(process, "eps-prediction (Eps)",
                        "at T, x_t = eps carries nothing of x0, and x0 = (x_t - sigma eps) / alpha divides by 0")

    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Prediction:
        alpha, sigma = coefficients(process, t, x_t.ndim)
        return Prediction(x0=(x_t - sigma * output) / alpha, eps=output, raw=output)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        return eps

    def x0_error_scale(self, t: Tensor, process: ForwardProcess) -> Tensor:
        return process.sigma(t) / process.alpha(t)


class X0(Parameterization):
    """The network predicts the clean data x0."""

    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Prediction:
        return _from_x0(output, x_t, t, process, output)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        return x0

    def x0_error_scale(self, t: Tensor, process: ForwardProcess) -> Tensor:
        return torch.ones_like(process.alpha(t))


class V(Parameterization):
    """The network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022, App. D)."""

    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Prediction:
        alpha, sigma = coefficients(process, t, x_t.ndim)
        norm = alpha**2 + sigma**2
        return Prediction(x0=(alpha * x_t - sigma * output) / norm, eps=(sigma * x_t + alpha * output) / norm,
                          raw=output)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        alpha, sigma = coefficients(process, t, x0.ndim)
        return alpha * eps - sigma * x0

    def x0_error_scale(self, t: Tensor, process: ForwardProcess) -> Tensor:
        alpha, sigma = process.alpha(t), process.sigma(t)
        return sigma / (alpha**2 + sigma**2)


class Velocity(Parameterization):
    """The network predicts the velocity u = eps - x0 of the linear interpolant x_t = (1 - t) x0 + t eps (flow
    matching, Lipman et al. 2023; rectified flow, Liu et al. 2023): dx_t/dt = u. On any process,
    x0 = (x_t - sigma u) / (alpha + sigma) and eps = (x_t + alpha u) / (alpha + sigma)."""

    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Prediction:
        alpha, sigma = coefficients(process, t, x_t.ndim)
        total = alpha + sigma
        return Prediction(x0=(x_t - sigma * output) / total, eps=(x_t + alpha * output) / total, raw=output)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        return eps - x0

    def x0_error_scale(self, t: Tensor, process: ForwardProcess) -> Tensor:
        alpha, sigma = process.alpha(t), process.sigma(t)
        return sigma / (alpha + sigma)


class EDM(Parameterization):
    """EDM's preconditioning (Karras et al. 2022, eq. 7 and Table 1) on any process, in its EDM form x~ = x_t / alpha
    at noise level sigma~ = sigma / alpha: D(x~; sigma~) = c_skip x~ + c_out F(c_in x~; c_noise) with

        c_skip = sigma_data^2 / (sigma~^2 + sigma_data^2),   c_out = sigma~ sigma_data / sqrt(sigma~^2 + sigma_data^2),
        c_in = 1 / sqrt(sigma~^2 + sigma_data^2),              c_noise = ln(sigma~) / 4,

    so the network's input and target have unit variance at every noise level (for data of std sigma_data).

    Args:
        sigma_data: The data's standard deviation (0.5 for images in [-1, 1], as in EDM).
    """

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"EDM's sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def check(self, process: ForwardProcess) -> None:
        """Refuse a zero-terminal-SNR process: at alpha(T) = 0 the noise level sigma~ = sigma / alpha is infinite."""
        refuse_zero_snr(process, "EDM preconditioning",
                        "its net sees x_t / alpha at c_noise = ln(sigma / alpha) / 4, infinite at T")

    def noise_level(self, t: Tensor, process: ForwardProcess) -> Tensor:
        """sigma~(t) = sigma(t) / alpha(t), (B,)."""
        return process.sigma(t) / process.alpha(t)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at noise levels ``sigma`` (Table 1, "Ours")."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def net_input(self, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        c_in = self.scalings(self.noise_level(t, process))[2]
        return append_dims(c_in / process.alpha(t), x_t.ndim) * x_t

    def net_time(self, t: Tensor, process: ForwardProcess) -> Tensor:
        return self.scalings(self.noise_level(t, process))[3]

    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Prediction:
        c_skip, c_out, _, _ = self.scalings(self.noise_level(t, process))
        x_tilde = x_t / append_dims(process.alpha(t), x_t.ndim)
        x0 = append_dims(c_skip, x_t.ndim) * x_tilde + append_dims(c_out, x_t.ndim) * output
        return _from_x0(x0, x_t, t, process, output)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        """F's target (x0 - c_skip x~) / c_out (Karras et al. 2022, eq. 8), x~ = x0 + sigma~ eps."""
        sigma = self.noise_level(t, process)
        c_skip, c_out, _, _ = self.scalings(sigma)
        x_tilde = x0 + append_dims(sigma, x0.ndim) * eps
        return (x0 - append_dims(c_skip, x0.ndim) * x_tilde) / append_dims(c_out, x0.ndim)

    def x0_error_scale(self, t: Tensor, process: ForwardProcess) -> Tensor:
        return self.scalings(self.noise_level(t, process))[1]


class LearnedVariance(Parameterization):
    """``inner``'s prediction plus a learned reverse variance: the network outputs twice the image channels, the
    second half v in [-1, 1] mapped to the weight (v + 1) / 2 between log beta_t and log beta-tilde_t (Nichol &
    Dhariwal 2021, eq. 15); needs a discrete (DDPM) process.

    Args:
        inner: The parameterization of the mean (default ``Eps()``).
    """

    output_factor = 2

    def __init__(self, inner: Parameterization | None = None) -> None:
        if inner is not None and not isinstance(inner, Parameterization):
            raise ValueError(f"LearnedVariance wraps a Parameterization (Eps, X0, V, ...), got {type(inner).__name__}")
        if isinstance(inner, LearnedVariance):
            raise ValueError("LearnedVariance cannot wrap another LearnedVariance")
        self.inner = inner if inner is not None else Eps()
        self.divides_by_alpha = self.inner.divides_by_alpha

    def check(self, process: ForwardProcess) -> None:
        if not hasattr(process, "interpolated_log_variance"):
            raise ValueError(f"learned variance needs a discrete (DDPM) process; {type(process).__name__} has no "
                             "beta_t / beta-tilde_t to interpolate between")
        self.inner.check(process)

    def net_input(self, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        return self.inner.net_input(x_t, t, process)

    def net_time(self, t: Tensor, process: ForwardProcess) -> Tensor:
        return self.inner.net_time(t, process)

    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, process: ForwardProcess) -> Prediction:
        if output.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(f"a learned-variance net must output 2 x {x_t.shape[1]} channels, got "
                             f"{output.shape[1]}: set the net's learn_sigma: true")
        mean_output, v = output.chunk(2, dim=1)
        pred = self.inner.prediction(mean_output, x_t, t, process)
        pred.log_var = process.interpolated_log_variance((v + 1) / 2, t)  # type: ignore[attr-defined]
        return pred

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
        return self.inner.target(x0, eps, t, process)

    def x0_error_scale(self, t: Tensor, process: ForwardProcess) -> Tensor:
        return self.inner.x0_error_scale(t, process)


def from_prediction_kind(prediction: str, learned_variance: bool = False) -> Parameterization:
    """The part of an earlier config's or checkpoint's ``prediction: eps|x0|v`` and ``learned_variance`` flag."""
    parts = {"eps": Eps, "x0": X0, "v": V}
    if prediction not in parts:
        raise ValueError(f"unknown prediction kind {prediction!r}; choose one of {', '.join(PREDICTION_KINDS)}")
    inner = parts[prediction]()
    return LearnedVariance(inner) if learned_variance else inner
