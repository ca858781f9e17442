"""Exact reverse transitions of Gaussian data under a discrete DDPM process (test helper, no network)."""

from __future__ import annotations

import torch
from analytic import gaussian_denoiser
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn, Prediction
from diffusion_pl.processes import DiscreteProcess


def gaussian_reverse_denoiser(mean: Tensor, std: Tensor, process: DiscreteProcess) -> DenoiseFn:
    """Exact E[x0 | x_t] plus the exact reverse variance Var[x_{t-1} | x_t] for x0 ~ N(mean, diag(std^2)) under a
    discrete DDPM process: Var[x_{t-1} | x_t] = beta-tilde_t + c_t^2 Var[x0 | x_t] with c_t the posterior's x0
    coefficient and Var[x0 | x_t] = std^2 s^2 / (a^2 std^2 + s^2); at t = 1 it is Var[x0 | x_1] (c_1 = 1)."""
    base = gaussian_denoiser(mean, std, process)

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        pred = base(x_t, t)
        a = append_dims(process.alpha(t), x_t.ndim)
        s = append_dims(process.sigma(t), x_t.ndim)
        x0_var = std**2 * s**2 / (a**2 * std**2 + s**2)
        coef = append_dims(process.posterior_coef_x0[t], x_t.ndim)
        beta_tilde = append_dims(process.posterior_variance[t], x_t.ndim)
        pred.log_var = torch.log(beta_tilde + coef**2 * x0_var).expand_as(x_t)
        return pred

    return denoise
