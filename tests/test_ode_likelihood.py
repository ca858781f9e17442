"""Probability-flow ODE log-likelihood against exact Gaussian log-densities; dequantization and bits/dim.

For Gaussian data N(m, S) the noised marginal is N(alpha m, C_t) with C_t = alpha^2 S + sigma^2 I, and the
probability flow keeps the standardized point C_t^{-1/2} (x_t - alpha_t m) fixed, so x(1) and every term of
log p(x) = log prior(x(1)) + int div are closed form. The ODE likelihood's only model error is the prior:
it uses prior(x(1)) where the true marginal is N(alpha_1 m, C_1).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from analytic import correlated_gaussian_denoiser
from diffusion_pl.likelihood import bits_per_dim, dequantize, ode_log_likelihood
from diffusion_pl.processes import VESDE, VPSDE, FlowProcess, SDEProcess, SubVPSDE

MEAN = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
COV = torch.tensor([[0.30, 0.12, 0.05], [0.12, 0.20, -0.06], [0.05, -0.06, 0.10]], dtype=torch.float64)
# Better conditioned (eigenvalues 0.5, 0.8, 1.4) so that Hutchinson's per-probe variance stays small.
ROTATION = torch.linalg.qr(torch.tensor([[1.0, 0.4, -0.3], [0.2, 1.0, 0.5], [-0.4, 0.3, 1.0]],
                                        dtype=torch.float64))[0]
WELL_CONDITIONED_COV = ROTATION @ torch.diag(torch.tensor([0.5, 0.8, 1.4], dtype=torch.float64)) @ ROTATION.T
PROCESSES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "flow": FlowProcess}
PRIOR_STD = {"vp": 1.0, "subvp": 1.0, "ve": 50.0, "flow": 1.0}


#: Small tensors: one intra-op thread (conftest.py's fixture) is several times faster than two on a 2-core machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def marginal(process: SDEProcess, t: float, mean: torch.Tensor, cov: torch.Tensor) -> MultivariateNormal:
    """N(alpha_t m, alpha_t^2 S + sigma_t^2 I), the law of x_t for Gaussian data."""
    tt = torch.tensor([t], dtype=torch.float64)
    a, s = process.alpha(tt).item(), process.sigma(tt).item()
    return MultivariateNormal(a * mean, a**2 * cov + s**2 * torch.eye(len(mean), dtype=torch.float64))


def sqrtm(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.sqrt()) @ vectors.T


def ode_likelihood_closed_form(name: str, x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """What the ODE likelihood computes, exactly: log p_{t_min}(x) + log prior(x(T)) - log p_T(x(T)), T = t_max, with
    the flow map x(T) = alpha_T m + C_T^{1/2} C_{t_min}^{-1/2} (x - alpha_{t_min} m) and the prior N(0, c^2 I)."""
    process = PROCESSES[name]()
    start, end = marginal(process, process.t_min, mean, cov), marginal(process, process.t_max, mean, cov)
    flow = sqrtm(end.covariance_matrix) @ torch.linalg.inv(sqrtm(start.covariance_matrix))
    x1 = end.mean + (x - start.mean) @ flow.T
    prior = torch.distributions.Normal(0.0, PRIOR_STD[name]).log_prob(x1).sum(1)
    return start.log_prob(x) + prior - end.log_prob(x1)


def data(n: int, cov: torch.Tensor, seed: int) -> torch.Tensor:
    return MEAN + torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ sqrtm(cov)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_exact_divergence_matches_the_gaussian_log_density(name: str) -> None:
    """Within 0.01 nats/dim of log N(x; m, S) (the gap is the prior mismatch at t = 1), and within 1e-4 of the
    closed form that accounts for the prior (float64, rk45 at 1e-7)."""
    process = PROCESSES[name]()
    x = data(16, COV, seed=0)
    den = correlated_gaussian_denoiser(MEAN, COV, process)
    loglik = ode_log_likelihood(den, process, x, exact_divergence=True, rtol=1e-7, atol=1e-7)
    exact = MultivariateNormal(MEAN, COV).log_prob(x)
    assert (loglik - exact).abs().max().item() < 0.01 * 3
    torch.testing.assert_close(loglik, ode_likelihood_closed_form(name, x, MEAN, COV), rtol=0, atol=1e-4)


def test_float32_default_tolerances_are_accurate() -> None:
    process = VPSDE()
    x = data(16, COV, seed=1)
    stats: dict[str, int] = {}
    loglik = ode_log_likelihood(correlated_gaussian_denoiser(MEAN, COV, process), process, x.float(),
                                exact_divergence=True, stats=stats)
    assert loglik.dtype == torch.float32 and 0 < stats["nfe"] < 500
    expected = ode_likelihood_closed_form("vp", x, MEAN, COV).float()
    torch.testing.assert_close(loglik, expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize(("name", "probe"), [("vp", "rademacher"), ("vp", "gaussian"), ("ve", "rademacher")])
def test_hutchinson_estimate_is_unbiased(name: str, probe: str) -> None:
    """Averaged over 2048 samples x 8 probes, the estimate's error has mean within 5 standard errors (from the
    errors' own spread) of the closed form, and the average log-likelihood is within 0.01 nats/dim of the
    data's. (VE with Gaussian probes is left out: its divergence has a large isotropic part, log(sigma_max /
    sigma), that Rademacher probes get exactly but Gaussian probes estimate with a per-probe std near 10.)"""
    process = PROCESSES[name]()
    x = data(2048, WELL_CONDITIONED_COV, seed=2)
    den = correlated_gaussian_denoiser(MEAN, WELL_CONDITIONED_COV, process)
    loglik = ode_log_likelihood(den, process, x, hutchinson=probe, num_probes=8,
                                generator=torch.Generator().manual_seed(3))
    errors = loglik - ode_likelihood_closed_form(name, x, MEAN, WELL_CONDITIONED_COV)
    standard_error = errors.std().item() / math.sqrt(len(errors))
    assert abs(errors.mean().item()) < 5 * standard_error + 1e-3
    exact = MultivariateNormal(MEAN, WELL_CONDITIONED_COV).log_prob(x)
    assert abs((loglik - exact).mean().item()) < 0.01 * 3


def test_probes_are_seeded() -> None:
    process = VPSDE()
    den = correlated_gaussian_denoiser(MEAN, COV, process)
    x = data(4, COV, seed=4)
    runs = [ode_log_likelihood(den, process, x, method="heun", steps=20, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match="unknown Hutchinson probe"):
        ode_log_likelihood(den, process, x, hutchinson="sphere")


def test_bits_per_dim_by_hand() -> None:
    """bpd = (nll + D ln 128) / (D ln 2): 0 nats -> 7 bits; a density uniform on [-1, 1]^D (nll = D ln 2) -> 8 bits,
    the code length of uniform 8-bit pixels; 5000 nats over 3072 dims -> 5000 / (3072 ln 2) + 7."""
    nll = torch.tensor([0.0, 3072 * math.log(2), 5000.0])
    expected = torch.tensor([7.0, 8.0, 5000 / (3072 * 0.6931471805599453) + 7])
    torch.testing.assert_close(bits_per_dim(nll, 3072), expected)
    assert bits_per_dim(torch.tensor([0.0]), 10, bins_per_unit=127.5).item() == pytest.approx(math.log2(127.5))


def test_dequantize_fills_each_pixel_bin() -> None:
    """Pixel k (stored as k / 127.5 - 1) becomes uniform on [k / 128 - 1, (k + 1) / 128 - 1] (the upper edge is
    reachable only through float32 rounding of k + u)."""
    k = torch.arange(256, dtype=torch.float32).repeat(2000)
    y = dequantize(k / 127.5 - 1, generator=torch.Generator().manual_seed(0))
    low, high = k / 128 - 1, (k + 1) / 128 - 1
    assert bool((y >= low).all()) and bool((y <= high).all())
    offset = (y - low) * 128
    assert abs(offset.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / len(k))
    assert y.min().item() >= -1 and y.max().item() <= 1
