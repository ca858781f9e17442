"""The DDPM variational bound L_vlb = L_T + sum_{t>1} L_{t-1} + L_0 and its bits/dim (Ho et al. 2020, eq. 5).

All terms are per-sample and in nats, summed over data dimensions:
  L_T     = KL(q(x_T | x0) || N(0, I))
  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))                 (t = 2..T)
  L_0     = -log p(x0 | x1), a discretized Gaussian for 8-bit data       (Ho et al. 2020, eq. 13)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims, sum_except_batch
from diffusion_pl.parameterization import DenoiseFn, Prediction
from diffusion_pl.processes.discrete import DiscreteProcess, FixedVariance

Decoder = Literal["discretized", "gaussian"]
BIN_HALF_WIDTH = 1.0 / 255.0  # 256 levels spread over [-1, 1]: bin width 2/255


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x), computed with erf."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log P(x) for 8-bit data x in [-1, 1] under N(mean, e^(2 log_scale)) integrated over x's bin
    [x - 1/255, x + 1/255], the outermost bins extended to -inf and +inf (Ho et al. 2020, eq. 13)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (centered + BIN_HALF_WIDTH))
    cdf_minus = standard_normal_cdf(inv_std * (centered - BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Elementwise log N(x; mean, e^log_var) (a density: for continuous data)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def prior_kl(process: DiscreteProcess, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) per sample, in nats."""
    t = torch.full((x0.shape[0],), process.num_steps, device=x0.device, dtype=torch.long)
    mean = append_dims(process.alpha(t), x0.ndim) * x0
    log_var = append_dims((process.sigma(t) ** 2).log(), x0.ndim).expand_as(x0)
    return sum_except_batch(normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0)))


def model_log_variance(pred: Prediction, process: DiscreteProcess, t: Tensor, ndim: int,
                       fixed_variance: FixedVariance) -> Tensor:
    """The reverse log-variance: the learned one if the denoiser returned it, else the fixed table."""
    if pred.log_var is not None:
        return pred.log_var
    return append_dims(process.fixed_log_variance(t, fixed_variance), ndim)


def vlb_term(pred: Prediction, process: DiscreteProcess, x0: Tensor, x_t: Tensor, t: Tensor, *,
             fixed_variance: FixedVariance = "beta", decoder: Decoder = "discretized") -> Tensor:
    """L_{t-1} for each sample's own t (nats, summed over dims): the Gaussian KL for t > 1 and the decoder's
    negative log-likelihood -log p(x0 | x1) for t = 1. ``pred`` is the denoiser's output at (x_t, t)."""
    true_mean, true_log_var = process.posterior(x0, x_t, t)
    model_mean, _ = process.posterior(pred.x0, x_t, t)
    log_var = model_log_variance(pred, process, t, x0.ndim, fixed_variance)
    kl = sum_except_batch(normal_kl(true_mean, append_dims(true_log_var, x0.ndim).expand_as(x0), model_mean, log_var))
    if decoder == "discretized":
        nll = -sum_except_batch(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var))
    else:
        nll = -sum_except_batch(gaussian_log_likelihood(x0, model_mean, log_var.expand_as(x0)))
    return torch.where(t == 1, nll, kl)


def stratified_steps(low: int, high: int, count: int, batch: int,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """For each sample, one uniformly random step from each of ``count`` near-equal strata of low..high.

    Returns:
        (steps (count, batch) long, weights (count,)) with weight = stratum size, so sum_k weight_k f(t_k) is an
        unbiased estimate of sum_{t=low}^{high} f(t) for every sample; exact when count = high - low + 1.
    """
    count = max(1, min(count, high - low + 1))
    edges = torch.linspace(low, high + 1, count + 1, dtype=torch.float64).round().long()
    sizes = edges[1:] - edges[:-1]
    device = generator.device if generator is not None else "cpu"
    uniform = torch.rand(count, batch, generator=generator, device=device, dtype=torch.float64).cpu()
    return edges[:-1, None] + (uniform * sizes[:, None]).long(), sizes.double()


def variational_bound(denoise: DenoiseFn, process: DiscreteProcess, x0: Tensor, *, num_terms: int | None = None,
                      fixed_variance: FixedVariance = "beta", decoder: Decoder = "discretized",
                      generator: torch.Generator | None = None) -> Tensor:
    """Per-sample L_vlb in nats: L_T + L_0 exactly, plus every L_{t-1} for t = 2..T (``num_terms`` None) or a
    stratified unbiased estimate of their sum from ``num_terms`` - 1 network evaluations (steps drawn per sample)."""
    batch = x0.shape[0]
    terms = [(torch.ones(batch, dtype=torch.long), 1.0)]
    if process.num_steps > 1:
        count = process.num_steps - 1 if num_terms is None else max(1, num_terms - 1)
        steps, weights = stratified_steps(2, process.num_steps, count, batch, generator)
        terms += list(zip(steps, weights.tolist()))
    total = prior_kl(process, x0)
    for t, weight in terms:
        t = t.to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = process.add_noise(x0, t, noise)
        term = vlb_term(denoise(x_t, t), process, x0, x_t, t, fixed_variance=fixed_variance, decoder=decoder)
        total = total + weight * term
    return total


def nats_to_bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """Convert per-sample nats to bits per dimension."""
    return nats / (num_dims * math.log(2.0))
