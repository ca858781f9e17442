"""Closed forms for tests (no network): denoisers for data whose E[x0 | x_t] is known exactly, and Gaussian features
with exact sample moments."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn, Prediction, eps_from_x0
from diffusion_pl.processes.base import ForwardProcess


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


def gaussian_mixture_denoiser(weights: Tensor, means: Tensor, stds: Tensor, process: ForwardProcess) -> DenoiseFn:
    """Exact E[x0 | x_t] for x0 ~ sum_k w_k N(m_k, s_k^2 I) in D dims, x_t of shape (B, D).

    Given x_t = a x0 + s eps, component k's marginal is N(a m_k, (a^2 s_k^2 + s^2) I), so the responsibilities
    are r_k(x_t) = softmax_k(log w_k + log N(x_t; a m_k, (a^2 s_k^2 + s^2) I)) and
    E[x0 | x_t] = sum_k r_k (m_k + a s_k^2 / (a^2 s_k^2 + s^2) (x_t - a m_k)); the score follows by Tweedie.

    Args:
        weights: (K,) mixture weights summing to 1.
        means: (K, D) component means.
        stds: (K,) isotropic component standard deviations.
        process: The forward process giving alpha(t), sigma(t).
    """

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        w, m, sd = weights.to(x_t), means.to(x_t), stds.to(x_t)
        a, s = append_dims(process.alpha(t), 2), append_dims(process.sigma(t), 2)
        var = a**2 * sd**2 + s**2
        diff = x_t.unsqueeze(1) - a.unsqueeze(-1) * m
        log_r = w.log() - 0.5 * (diff**2).sum(-1) / var - 0.5 * x_t.shape[1] * var.log()
        gain = a * sd**2 / var
        x0_k = m + gain.unsqueeze(-1) * diff
        x0 = (log_r.softmax(-1).unsqueeze(-1) * x0_k).sum(1)
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process))

    return denoise


def correlated_gaussian_denoiser(mean: Tensor, cov: Tensor, process: ForwardProcess) -> DenoiseFn:
    """Exact E[x0 | x_t] for x0 ~ N(mean, cov) with a full covariance, x_t of shape (B, D):
    E[x0 | x_t] = mean + a cov (a^2 cov + s^2 I)^{-1} (x_t - a mean)  (Gaussian conjugacy)."""

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        m, c = mean.to(x_t), cov.to(x_t)
        a, s = process.alpha(t), process.sigma(t)
        system = append_dims(a**2, 3) * c + append_dims(s**2, 3) * torch.eye(c.shape[0]).to(x_t)
        solved = torch.linalg.solve(system, (x_t - append_dims(a, 2) * m).unsqueeze(-1)).squeeze(-1)
        x0 = m + append_dims(a, 2) * solved @ c
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process))

    return denoise


class ConstantProcess(ForwardProcess):
    """A forward process that is neither discrete nor an SDE (alpha = 0.5, sigma = 0.5 at every time)."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.full(t.shape, 0.5)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.full(t.shape, 0.5)

    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        return torch.zeros(n, device=device)

    def net_input_time(self, t: Tensor) -> Tensor:
        return t.float()

    def probe_times(self) -> Tensor:
        return torch.zeros(1)


def gaussian_features(mean: Tensor, covariance: Tensor, n: int, seed: int) -> Tensor:
    """n float64 samples whose sample mean and unbiased sample covariance equal ``mean`` and ``covariance``."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # exactly white
    return mean + z @ torch.linalg.cholesky(covariance).T
