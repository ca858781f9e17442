"""Improved DDPM: KL and decoder terms, the variational bound vs exact likelihoods, learned variance, respacing."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats
from torch import Tensor, nn

from analytic import gaussian_denoiser
from analytic_reverse import gaussian_reverse_denoiser
from diffusion_pl.likelihood.vlb import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    stratified_steps,
    variational_bound,
)
from diffusion_pl.losses import HybridLoss, VLBLoss
from diffusion_pl.parameterization import Denoiser, Eps, LearnedVariance
from diffusion_pl.processes import DiscreteProcess
from diffusion_pl.samplers import sample_ddpm, strided_steps

MEAN, STD = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.8])


def test_normal_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    lv1, lv2 = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.01), (0.37, 0.05), (-0.98, 0.2), (0.999, 0.003)])
def test_discretized_decoder_bins_sum_to_one_and_match_integration(mean: float, scale: float) -> None:
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    log_p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                torch.full_like(levels, math.log(scale)))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    density = stats.norm(mean, scale).pdf
    for k in (0, 3, 127, 128, 200, 255):
        low = -math.inf if k == 0 else levels[k].item() - 1 / 255
        high = math.inf if k == 255 else levels[k].item() + 1 / 255
        points = [mean] if low < mean < high else None
        mass = integrate.quad(density, low, high, points=points if math.isfinite(low) and math.isfinite(high) else None,
                              epsabs=1e-13)[0]
        assert log_p[k].exp().item() == pytest.approx(mass, abs=1e-7, rel=1e-4)


def test_stratified_steps_cover_each_stratum() -> None:
    steps, weights = stratified_steps(2, 1000, 10, batch=500, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (10, 500) and weights.sum().item() == 999
    edges = torch.cat([torch.tensor([2]), 2 + weights.cumsum(0).long()])
    for k in range(10):
        assert bool((steps[k] >= edges[k]).all()) and bool((steps[k] < edges[k + 1]).all())
    exact, full_weights = stratified_steps(2, 50, 49, batch=3)
    assert exact[:, 0].tolist() == list(range(2, 51)) and full_weights.tolist() == [1.0] * 49


def _gap(denoise_factory, num_steps: int, n: int = 20_000, terms: int = 100) -> tuple[float, float]:
    """Mean and standard error of (bound - exact NLL) in nats for Gaussian data x0 ~ N(MEAN, STD^2)."""
    gen = torch.Generator().manual_seed(num_steps)
    x0 = MEAN + STD * torch.randn(n, 2, generator=gen)
    exact = -torch.distributions.Normal(MEAN, STD).log_prob(x0).sum(1)
    process = DiscreteProcess(num_steps, "linear")
    bound = variational_bound(denoise_factory(MEAN, STD, process), process, x0, num_terms=terms, decoder="gaussian",
                              generator=gen)
    diff = bound - exact
    return diff.mean().item(), diff.std().item() / math.sqrt(n)


@pytest.mark.parametrize("num_steps", [100, 1000, 4000])
def test_bound_with_exact_reverse_process_equals_nll(num_steps: int) -> None:
    """With the exact reverse transitions of Gaussian data the bound is tight: gap ~ 0 within MC error and
    within 0.01 nats per dimension, and never significantly negative."""
    gap, stderr = _gap(gaussian_reverse_denoiser, num_steps)
    assert gap > -5 * stderr
    assert abs(gap) < 5 * stderr + 0.01 * 2


@pytest.mark.parametrize("num_steps", [100, 1000])
def test_bound_with_fixed_variance_is_above_nll(num_steps: int) -> None:
    """A fixed reverse variance (beta_t) with the exact mean is still a valid, looser bound."""
    gap, stderr = _gap(gaussian_denoiser, num_steps)
    tight, _ = _gap(gaussian_reverse_denoiser, num_steps)
    assert gap > 5 * stderr and gap > tight


def test_ddpm_uses_learned_variance() -> None:
    """On an 11-step respaced chain, the exact reverse variance reproduces Gaussian data; the same means with
    the fixed variance do not, so a sampler ignoring ``log_var`` would fail."""
    base = DiscreteProcess(1000, "linear")
    process = base.respace([1, *range(100, 1001, 100)])
    gen = torch.Generator().manual_seed(0)
    x_T = process.prior_sample((40_000, 2), generator=gen)
    exact = sample_ddpm(gaussian_reverse_denoiser(MEAN, STD, process), process, x_T, generator=gen)
    fixed = sample_ddpm(gaussian_denoiser(MEAN, STD, process), process, x_T, generator=gen)
    stderr = STD / math.sqrt(2 * x_T.shape[0])
    assert bool(((exact.std(0) - STD).abs() < 5 * stderr).all())
    assert bool(((fixed.std(0) - STD).abs() > 10 * stderr).any())


def test_respacing_with_all_steps_equals_the_full_sampler() -> None:
    process = DiscreteProcess(200, "cosine")
    respaced = process.respace(strided_steps(200, 200).tolist())
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    full = sample_ddpm(gaussian_denoiser(MEAN, STD, process), process, x_T, generator=torch.Generator().manual_seed(2))
    again = sample_ddpm(gaussian_denoiser(MEAN, STD, respaced), respaced, x_T,
                        generator=torch.Generator().manual_seed(2))
    assert torch.equal(full, again)


def test_respaced_process_keeps_alpha_bar_and_original_times() -> None:
    process = DiscreteProcess(1000, "linear")
    steps = [10, 250, 600, 1000]
    respaced = process.respace(steps)
    torch.testing.assert_close(respaced.alphas_cumprod[1:], process.alphas_cumprod[steps])
    assert respaced.net_input_time(torch.tensor([1, 4])).tolist() == [10.0, 1000.0]
    betas = respaced.betas[1:].double()
    assert betas[1].item() == pytest.approx(1 - (process.alphas_cumprod[250] / process.alphas_cumprod[10]).item(),
                                            rel=1e-5)
    with pytest.raises(ValueError, match="increase strictly"):
        process.respace([5, 5, 9])


class VarianceNet(nn.Module):
    """Outputs eps = 0 and a learnable constant v for every pixel (learn_sigma layout: [eps, v])."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(x), self.v.expand_as(x)], dim=1)


class PlainNet(nn.Module):
    """Outputs only the image channels, like a net built without learn_sigma."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)


def test_learned_variance_interpolates_between_beta_and_beta_tilde() -> None:
    process = DiscreteProcess(1000, "linear")
    net = VarianceNet()
    denoiser = Denoiser(net, process, LearnedVariance(Eps()))
    t = torch.tensor([5, 500])
    x = torch.zeros(2, 1, 2, 2)
    for v, expected in [(1.0, process.betas[t].log()), (-1.0, process.posterior_log_variance_clipped[t])]:
        net.v.data.fill_(v)
        torch.testing.assert_close(denoiser(x, t).log_var[:, 0, 0, 0], expected)
    with pytest.raises(ValueError, match="learn_sigma"):
        Denoiser(PlainNet(), process, LearnedVariance(Eps()))(x, t)


def test_hybrid_loss_trains_variance_not_mean_through_vlb() -> None:
    """The L_vlb part of L_hybrid reaches the variance output only (stop-gradient on the mean)."""
    process = DiscreteProcess(100, "linear")
    net = VarianceNet()
    denoiser = Denoiser(net, process, LearnedVariance(Eps()))
    x0 = torch.rand(32, 1, 4, 4) * 2 - 1
    HybridLoss()(denoiser, x0, generator=torch.Generator().manual_seed(0)).mean().backward()
    assert net.v.grad is not None and net.v.grad.abs().item() > 0
    with pytest.raises(ValueError, match="learned variance"):
        HybridLoss()(Denoiser(PlainNet(), process, Eps()), x0)


def test_vlb_importance_sampling_warms_up_then_follows_loss_scale() -> None:
    process = DiscreteProcess(4, "cosine")
    loss = VLBLoss(history=2)
    loss._ensure_history(4, torch.device("cpu"))
    assert torch.allclose(loss.step_probabilities(4), torch.full((4,), 0.25))
    loss._record(torch.tensor([1, 1, 2, 2, 3, 3, 4, 4]), torch.tensor([4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]))
    probs = loss.step_probabilities(4)
    expected = 0.999 * torch.tensor([4.0, 1.0, 1.0, 2.0]) / 8 + 0.001 / 4
    torch.testing.assert_close(probs, expected)
    t, weight = loss.sample_t(Denoiser(VarianceNet(), process, LearnedVariance(Eps())), 10_000, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    assert (t == 1).float().mean().item() == pytest.approx(expected[0].item(), abs=0.02)
    torch.testing.assert_close(weight, 1 / (4 * expected[t - 1]))
    assert "loss_history" in loss.state_dict()
