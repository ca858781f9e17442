"""Closed-form denoisers for data whose E[x0 | x_t] is known exactly (test helpers, no network)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.parameterization import DenoiseFn, Prediction, eps_from_x0
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.utils import append_dims


def gaussian_denoiser(mean: Tensor, std: Tensor, process: ForwardProcess) -> DenoiseFn:
    """Exact E[x0 | x_t] for x0 ~ N(mean, diag(std^2)) and x_t = a x0 + s eps:
    E[x0 | x_t] = mean + a std^2 / (a^2 std^2 + s^2) (x_t - a mean)  (Gaussian conjugacy)."""

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        a = append_dims(process.alpha(t), x_t.ndim)
        s = append_dims(process.sigma(t), x_t.ndim)
        gain = a * std**2 / (a**2 * std**2 + s**2)
        x0 = mean + gain * (x_t - a * mean)
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process))

    return denoise


def point_mass_denoiser(x0_star: Tensor, process: ForwardProcess) -> DenoiseFn:
    """Exact denoiser when the data are a single point x0*: E[x0 | x_t] = x0*."""

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        x0 = x0_star.expand_as(x_t)
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process))

    return denoise
