"""Forward process and posterior against closed forms computed independently of the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_pl.processes import SCHEDULES, VESDE, VPSDE, DiscreteProcess, ForwardProcess, SubVPSDE
from diffusion_pl.processes.base import marginals_mismatch


def reference_alpha_bar(betas: list[float]) -> list[float]:
    """prod_{s<=t}(1 - beta_s) by a plain float64 loop; index 0 is 1."""
    out, acc = [1.0], 1.0
    for beta in betas:
        acc *= 1.0 - beta
        out.append(acc)
    return out


@pytest.mark.parametrize("t", [1, 10, 250, 700, 1000])
def test_add_noise_matches_marginal(t: int) -> None:
    process = DiscreteProcess(1000, "linear")
    n, x0_value = 400_000, 0.7
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1), x0_value)
    steps = torch.full((n,), t)
    x_t = process.add_noise(x0, steps, torch.randn(n, 1, generator=gen))
    alpha_bar = reference_alpha_bar(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64).tolist())[t]
    mean, var = math.sqrt(alpha_bar) * x0_value, 1 - alpha_bar
    assert abs(x_t.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(x_t.var().item() - var) < 5 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_steps", [100, 1000, 4000])
def test_alpha_bar_T_near_zero(schedule: str, num_steps: int) -> None:
    process = DiscreteProcess(num_steps, schedule)
    assert process.alpha_bar(torch.tensor([num_steps])).item() < 1e-3
    assert process.alpha_bar(torch.tensor([0])).item() == 1.0
    assert bool((process.betas[1:] > 0).all()) and bool((process.betas[1:] < 1).all())


def test_linear_schedule_endpoints() -> None:
    process = DiscreteProcess(1000, "linear")
    assert process.beta(torch.tensor([1])).item() == pytest.approx(1e-4)
    assert process.beta(torch.tensor([1000])).item() == pytest.approx(0.02)
    expected = reference_alpha_bar([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)])
    assert process.alphas_cumprod.double().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("num_steps", [1000, 4000])
def test_cosine_schedule_matches_formula(num_steps: int) -> None:
    """alpha-bar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), wherever beta is below its 0.999 clip."""
    process = DiscreteProcess(num_steps, "cosine")
    s = 0.008
    f = [math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(num_steps + 1)]
    betas = process.betas[1:].double()
    unclipped = int((betas < 0.999).sum())
    assert unclipped >= num_steps - 2
    for t in range(0, unclipped + 1, max(1, num_steps // 50)):
        assert process.alpha_bar(torch.tensor([t])).item() == pytest.approx(f[t] / f[0], rel=1e-4, abs=1e-7)
    assert betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("t", [2, 3, 50, 500, 999, 1000])
def test_posterior_matches_bayes_rule(schedule: str, t: int) -> None:
    """q(x_{t-1} | x_t, x0) by 1-D Gaussian conjugacy: prior N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) on x_{t-1},
    likelihood N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t)."""
    process = DiscreteProcess(1000, schedule)
    betas = process.betas[1:].double().tolist()
    ab_prev = reference_alpha_bar(betas)[t - 1]
    beta = betas[t - 1]
    x0, x_t = torch.tensor([[0.3], [-1.2]]), torch.tensor([[1.1], [0.4]])
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    var = 1 / precision
    expected_mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * x_t / beta)
    mean, log_var = process.posterior(x0, x_t, torch.tensor([t, t]))
    torch.testing.assert_close(mean.double(), expected_mean.double(), rtol=1e-4, atol=1e-5)
    assert log_var[0].item() == pytest.approx(math.log(var), rel=1e-4, abs=1e-5)


def test_posterior_monte_carlo() -> None:
    """Sample (x_{t-1}, x_t) from the forward chain given x0; regress x_{t-1} on x_t to recover the posterior."""
    process = DiscreteProcess(1000, "linear")
    t, n, x0 = 300, 400_000, 0.5
    gen = torch.Generator().manual_seed(0)
    ab_prev = process.alpha_bar(torch.tensor([t - 1])).double().item()
    beta = process.beta(torch.tensor([t])).double().item()
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * torch.randn(n, generator=gen, dtype=torch.float64)
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, generator=gen, dtype=torch.float64)
    cov = torch.cov(torch.stack([x_t, x_prev]))
    slope = cov[0, 1] / cov[0, 0]
    residual_var = cov[1, 1] - slope * cov[0, 1]
    probe = torch.tensor([[0.8]])
    mean, log_var = process.posterior(torch.tensor([[x0]]), probe, torch.tensor([t]))
    regression_mean = x_prev.mean() + slope * (0.8 - x_t.mean())
    assert mean.item() == pytest.approx(regression_mean.item(), abs=5e-3)
    assert math.exp(log_var.item()) == pytest.approx(residual_var.item(), rel=2e-2)


def test_posterior_log_variance_clipped_at_t1() -> None:
    process = DiscreteProcess(1000, "linear")
    _, log_var = process.posterior(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1, 2]))
    assert log_var[0].item() == pytest.approx(log_var[1].item())
    assert process.posterior_variance_at(torch.tensor([1])).item() == 0.0


def test_bad_schedule_errors() -> None:
    with pytest.raises(ValueError, match="unknown beta schedule 'cosin'.*linear, cosine"):
        DiscreteProcess(1000, "cosin")
    with pytest.raises(ValueError, match="every beta must lie in"):
        DiscreteProcess(10, "linear")


def test_marginals_tell_processes_apart() -> None:
    """Equal processes (also rebuilt, or respaced onto all their steps) agree; another schedule, length or SDE does
    not, and the message names what differs."""
    cosine = DiscreteProcess(100, "cosine").marginals()
    assert set(cosine) == {"net_time", "alpha", "sigma"} and cosine["alpha"].shape == (100,)
    torch.testing.assert_close(cosine["alpha"] ** 2 + cosine["sigma"] ** 2, torch.ones(100))
    assert marginals_mismatch(cosine, DiscreteProcess(100, "cosine").marginals()) is None
    assert marginals_mismatch(cosine, DiscreteProcess(100, "cosine").respace(range(1, 101)).marginals()) is None
    assert "alpha" in marginals_mismatch(cosine, DiscreteProcess(100, "linear").marginals())
    assert "probe times" in marginals_mismatch(cosine, DiscreteProcess(50, "cosine").marginals())
    vp = VPSDE().marginals()
    assert marginals_mismatch(vp, VPSDE().marginals()) is None
    assert "sigma" in marginals_mismatch(vp, SubVPSDE(eps=1e-5).marginals())  # same alpha(t), other sigma(t)
    assert "net_time" in marginals_mismatch(vp, VPSDE(eps=1e-3).marginals())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_discrete_transition_is_the_product_of_one_step_kernels(schedule: str) -> None:
    """q(x_t | x_s) of DDPM composes the one-step kernels N(sqrt(1 - beta_k) x, beta_k) for k = s+1..t (Ho et al.
    2020, eq. 2): a = prod sqrt(1 - beta_k) and v_k = (1 - beta_k) v_{k-1} + beta_k, by a float64 loop over the
    betas; for s = t - 1 it is the one-step kernel itself."""
    process = DiscreteProcess(1000, schedule)
    betas = process.betas.double().tolist()
    for s, t in ((0, 1), (0, 1000), (9, 10), (499, 500), (999, 1000), (10, 700), (250, 900)):
        a_ref, v_ref = 1.0, 0.0
        for k in range(s + 1, t + 1):
            a_ref, v_ref = a_ref * math.sqrt(1 - betas[k]), (1 - betas[k]) * v_ref + betas[k]
        a, v = process.transition(torch.tensor([s]), torch.tensor([t]))
        assert a.item() == pytest.approx(a_ref, rel=1e-5)
        assert v.item() == pytest.approx(v_ref, rel=1e-3, abs=2e-7)
    t = torch.arange(1, 1001)
    a, v = process.transition(t - 1, t)
    torch.testing.assert_close(a, (1 - process.betas[1:]).sqrt())
    torch.testing.assert_close(v, process.betas[1:], rtol=1e-3, atol=2e-7)


def test_transition_is_defined_once_on_the_base_class() -> None:
    """Every process inherits ForwardProcess.transition (no subclass keeps its own copy)."""
    for cls in (DiscreteProcess, VPSDE, SubVPSDE, VESDE):
        assert cls.transition is ForwardProcess.transition
