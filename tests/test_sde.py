"""Continuous-time SDEs (Song et al. 2021) against closed forms and simulation of the forward SDE."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_pl.processes import VESDE, VPSDE, DiscreteProcess, SDEProcess, SubVPSDE

PROCESSES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


#: Small tensors: one intra-op thread (conftest.py's fixture) is several times faster than two on a 2-core machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def simulate_forward(process: SDEProcess, x0: float, n: int, steps: int, checkpoints: list[int],
                     gen: torch.Generator) -> dict[int, torch.Tensor]:
    """Euler–Maruyama paths of the forward SDE on [0, 1] from x(0) = x0 + sigma(0) z (sigma(0) = sigma_min
    for VE, 0 otherwise); returns the states at the given grid indices."""
    dt = 1.0 / steps
    x = x0 + process.sigma(torch.zeros(n)).unsqueeze(1) * torch.randn(n, 1, generator=gen)
    out = {}
    for k in range(steps):
        drift, diffusion = process.sde(x, torch.full((n,), k * dt))
        x = x + drift * dt + diffusion.unsqueeze(1) * math.sqrt(dt) * torch.randn(n, 1, generator=gen)
        if k + 1 in checkpoints:
            out[k + 1] = x.squeeze(1)
    return out


def vp_log_alpha(t: float, beta_min: float = 0.1, beta_max: float = 20.0) -> float:
    """log alpha(t) = -1/2 int_0^t (beta_min + s (beta_max - beta_min)) ds, typed out independently."""
    return -0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t**2)


def reference_marginal(name: str, x0: float, t: float) -> tuple[float, float]:
    """Mean alpha(t) x0 and variance sigma(t)^2 from the formulas of Song et al. 2021, App. B/C."""
    if name == "ve":
        return x0, (0.01 * 5000.0**t) ** 2
    alpha = math.exp(vp_log_alpha(t))
    sigma = math.sqrt(1 - alpha**2) if name == "vp" else 1 - alpha**2
    return alpha * x0, sigma**2


@pytest.mark.parametrize("name", list(PROCESSES))
def test_forward_sde_simulation_matches_marginals(name: str) -> None:
    """EM paths (100k, dt = 1/1000) have mean alpha(t) x0 and variance sigma(t)^2 within 5 standard errors plus
    a 2% relative allowance for EM's O(dt) bias: propagating EM's exact moment recursion for these linear SDEs,
    m <- (1 + f dt) m and v <- (1 + f dt)^2 v + g^2 dt, gives at most 1.2% (mean, at t = 1) and 1.7%
    (variance, sub-VP at t = 0.1) relative error at these checkpoints."""
    n, steps, x0 = 100_000, 1000, 1.2
    process = PROCESSES[name]()
    checkpoints = {100: 0.1, 300: 0.3, 600: 0.6, 1000: 1.0}
    states = simulate_forward(process, x0, n, steps, list(checkpoints), torch.Generator().manual_seed(0))
    for k, t in checkpoints.items():
        mean, var = reference_marginal(name, x0, t)
        x = states[k]
        mean_tol = 5 * math.sqrt(var / n) + 0.02 * abs(mean)
        var_tol = 5 * var * math.sqrt(2 / n) + 0.02 * var
        assert abs(x.mean().item() - mean) < mean_tol, (t, x.mean().item(), mean)
        assert abs(x.var().item() - var) < var_tol, (t, x.var().item(), var)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_sde_coefficients_solve_the_moment_odes(name: str) -> None:
    """For dx = f(t) x dt + g(t) dw: d alpha / dt = f(t) alpha and d sigma^2 / dt = 2 f(t) sigma^2 + g(t)^2
    (Song et al. 2021, eqs. 33-34), checked by central differences in float64."""
    process = PROCESSES[name]()
    t = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    h = 1e-6
    drift, diffusion = process.sde(torch.ones(10, 1, dtype=torch.float64), t)
    f = drift.squeeze(1)
    d_alpha = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
    d_var = (process.sigma(t + h) ** 2 - process.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(d_alpha, f * process.alpha(t), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d_var, 2 * f * process.sigma(t) ** 2 + diffusion**2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("t", [1e-5, 0.25, 0.5, 1.0])
def test_closed_form_coefficients(t: float) -> None:
    tt = torch.tensor([t], dtype=torch.float64)
    alpha = math.exp(vp_log_alpha(t))
    assert VPSDE().alpha(tt).item() == pytest.approx(alpha, rel=1e-12)
    assert VPSDE().sigma(tt).item() == pytest.approx(math.sqrt(-math.expm1(2 * vp_log_alpha(t))), rel=1e-10)
    assert SubVPSDE().sigma(tt).item() == pytest.approx(-math.expm1(2 * vp_log_alpha(t)), rel=1e-10)
    assert VESDE().sigma(tt).item() == pytest.approx(0.01 * 5000.0**t, rel=1e-12)
    assert VESDE().alpha(tt).item() == 1.0
    beta = 0.1 + 19.9 * t
    assert SubVPSDE().sde(torch.zeros(1, 1), tt)[1].item() ** 2 == pytest.approx(
        beta * (1 - math.exp(-2 * (0.1 * t + 0.5 * 19.9 * t**2))), rel=1e-6)
    assert VESDE().sde(torch.zeros(1, 1), tt)[1].item() == pytest.approx(
        0.01 * 5000.0**t * math.sqrt(2 * math.log(5000.0)), rel=1e-12)


def test_discrete_linear_schedule_converges_to_vp_sde() -> None:
    """DDPM's alpha-bar_i with beta_i = beta(i/T)/T approaches the VP SDE's alpha(i/T)^2 (Song et al. 2021,
    App. B): the gap is O(1/T) (sum of beta_i^2 and the left-point offset), so it shrinks 4x from T=1000 to 4000."""
    vp = VPSDE()
    gaps = []
    for num_steps in (1000, 4000):
        discrete = DiscreteProcess(num_steps, "linear")
        i = torch.arange(0, num_steps + 1)
        sde_alpha_bar = vp.alpha(i.double() / num_steps) ** 2
        gaps.append((discrete.alpha_bar(i).double() - sde_alpha_bar).abs().max().item())
    assert gaps[0] < 1e-3
    assert gaps[1] < gaps[0] / 3


@pytest.mark.parametrize("name", list(PROCESSES))
def test_transition_kernels_compose(name: str) -> None:
    """Chapman–Kolmogorov for Gaussian kernels: a(r,t) = a(s,t) a(r,s), v(r,t) = a(s,t)^2 v(r,s) + v(s,t),
    and the kernel from t = 0 (VP, sub-VP) is the marginal (alpha(t), sigma(t)^2)."""
    process = PROCESSES[name]()
    r, s, t = (torch.tensor([v], dtype=torch.float64) for v in (0.1, 0.4, 0.9))
    a_rs, v_rs = process.transition(r, s)
    a_st, v_st = process.transition(s, t)
    a_rt, v_rt = process.transition(r, t)
    torch.testing.assert_close(a_rt, a_st * a_rs)
    torch.testing.assert_close(v_rt, a_st**2 * v_rs + v_st)
    if name != "ve":
        a, v = process.transition(torch.zeros(1, dtype=torch.float64), t)
        torch.testing.assert_close(a, process.alpha(t))
        torch.testing.assert_close(v, process.sigma(t) ** 2)


def test_drifts_of_the_reverse_sde_and_probability_flow() -> None:
    """reverse = f - g^2 s (eq. 6), ode = f - g^2 s / 2 (eq. 13), with VP numbers typed out at t = 0.5."""
    process = VPSDE()
    x, score, t = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]]), torch.tensor([0.5])
    beta = 0.1 + 0.5 * 19.9
    f = -0.5 * beta * x
    torch.testing.assert_close(process.reverse_drift(x, t, score), f - beta * score)
    torch.testing.assert_close(process.ode_drift(x, t, score), f - 0.5 * beta * score)


def test_ve_prior() -> None:
    process = VESDE(sigma_min=0.01, sigma_max=50.0)
    z = process.prior_sample((50_000, 2), generator=torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 50.0) < 5 * 50.0 / math.sqrt(2 * 100_000)
    expected = torch.distributions.Normal(0.0, 50.0).log_prob(z).sum(1)
    torch.testing.assert_close(process.prior_logp(z), expected)
    std_normal = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(VPSDE().prior_logp(z), std_normal)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_training_times_and_network_time(name: str) -> None:
    process = PROCESSES[name]()
    t = process.sample_t(100_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and process.t_max == 1.0
    assert t.min().item() >= process.t_min and t.max().item() <= 1.0
    assert abs(t.mean().item() - (1 + process.t_min) / 2) < 5 * math.sqrt(1 / 12 / 100_000)
    torch.testing.assert_close(process.net_input_time(torch.tensor([process.t_min, 1.0])),
                               torch.tensor([999 * process.t_min, 999.0]))


def test_defaults_and_validation() -> None:
    assert (VPSDE().t_min, SubVPSDE().t_min, VESDE().t_min) == (1e-5, 1e-3, 1e-5)
    with pytest.raises(ValueError, match="eps must lie in"):
        VPSDE(eps=0.0)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        SubVPSDE(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_follows_input_dtype(dtype: torch.dtype) -> None:
    x, t = torch.ones(3, 2, dtype=dtype), torch.full((3,), 0.5, dtype=dtype)
    for process in (VPSDE(), SubVPSDE(), VESDE()):
        drift, diffusion = process.sde(x, t)
        assert drift.dtype == diffusion.dtype == process.alpha(t).dtype == process.sigma(t).dtype == dtype
