"""Reverse-SDE and probability-flow ODE samplers driven by exact scores (no network): they must reach the data.

The data are a 2-D Gaussian mixture with unequal weights, whose noised law at every t is again a mixture
(means alpha m_k, variances alpha^2 s_k^2 + sigma^2), so E[x0 | x_t] and the score are closed form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch

from analytic import gaussian_denoiser, gaussian_mixture_denoiser
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes import VESDE, VPSDE, SDEProcess, SubVPSDE
from diffusion_pl.samplers import encode_ode, integrate_ode, sample_euler_maruyama, sample_ode, sample_pc
from diffusion_pl.samplers.grids import sde_times

WEIGHTS = torch.tensor([0.3, 0.7])
MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
STDS = torch.tensor([0.1, 0.2])
N = 10_000
# Discretization allowances added to 5 standard errors. With 100k samples at the step counts below, the
# largest biases measured were 0.003 (weight), 0.002 (mean) and 2.5% (std, predictor-corrector at 500 steps,
# whose reverse-diffusion step (2 - a) x approximates x / a to first order and whose Langevin corrector has
# ULA's O(step size) variance bias); the ODE solvers' biases were below 1%.
WEIGHT_ALLOWANCE, MEAN_ALLOWANCE, STD_ALLOWANCE = 0.01, 0.01, 0.04


#: Small tensors: one intra-op thread (conftest.py's fixture) is several times faster than two on a 2-core machine.
pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLERS: dict[str, Callable[[DenoiseFn, SDEProcess, torch.Tensor, torch.Generator], torch.Tensor]] = {
    "euler_maruyama": lambda den, p, x, g: sample_euler_maruyama(den, p, x, grid=sde_times(p, 500), generator=g),
    "pc_reverse_diffusion": lambda den, p, x, g: sample_pc(den, p, x, grid=sde_times(p, 500), step_size_norm="batch",
                                                           generator=g),
    "reverse_diffusion": lambda den, p, x, g: sample_pc(den, p, x, grid=sde_times(p, 500), corrector_steps=0,
                                                        generator=g),
    "pc_euler_maruyama": lambda den, p, x, g: sample_pc(den, p, x, grid=sde_times(p, 500), predictor="euler_maruyama",
                                                        step_size_norm="batch", generator=g),
    "ode_euler": lambda den, p, x, g: sample_ode(den, p, x, method="euler", grid=sde_times(p, 500)),
    "ode_heun": lambda den, p, x, g: sample_ode(den, p, x, method="heun", grid=sde_times(p, 100)),
    "ode_rk45": lambda den, p, x, g: sample_ode(den, p, x, method="rk45", rtol=1e-4, atol=1e-4),
}


def expected_component_std(process: SDEProcess, std: float) -> float:
    """Std of E[x0 | x_{t_min}] within a component: a s^2 / sqrt(a^2 s^2 + sigma^2) at t_min (Tweedie shrinkage)."""
    t = torch.tensor([process.t_min], dtype=torch.float64)
    a, s = process.alpha(t).item(), process.sigma(t).item()
    return a * std**2 / math.sqrt(a**2 * std**2 + s**2)


def assert_matches_mixture(x: torch.Tensor, process: SDEProcess) -> None:
    """Nearest-mean classification gives the weights, and each class has the component's mean and std,
    within 5 standard errors plus the stated discretization allowances."""
    labels = torch.cdist(x, MEANS).argmin(1)
    n = x.shape[0]
    w0 = WEIGHTS[0].item()
    weight = (labels == 0).double().mean().item()
    assert abs(weight - w0) < 5 * math.sqrt(w0 * (1 - w0) / n) + WEIGHT_ALLOWANCE, f"weight {weight} vs {w0}"
    for k in range(len(WEIGHTS)):
        xs = x[labels == k]
        std = expected_component_std(process, STDS[k].item())
        mean_err = (xs.mean(0) - MEANS[k]).abs().max().item()
        std_err = (xs.std(0) / std - 1).abs().max().item()
        assert mean_err < 5 * std / math.sqrt(len(xs)) + MEAN_ALLOWANCE, f"component {k} mean off by {mean_err}"
        assert std_err < 5 / math.sqrt(2 * len(xs)) + STD_ALLOWANCE, f"component {k} std off by {std_err:.3f}"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("process_cls", [VPSDE, VESDE], ids=["vp", "ve"])
def test_sampler_reaches_gaussian_mixture(sampler: str, process_cls: type[SDEProcess]) -> None:
    process = process_cls()
    gen = torch.Generator().manual_seed(0)
    x_T = process.prior_sample((N, 2), generator=gen)
    x = SAMPLERS[sampler](gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process), process, x_T, gen)
    assert_matches_mixture(x, process)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "ode_rk45"])
def test_sub_vp_sampler_reaches_gaussian_mixture(sampler: str) -> None:
    process = SubVPSDE()
    gen = torch.Generator().manual_seed(1)
    x_T = process.prior_sample((N, 2), generator=gen)
    x = SAMPLERS[sampler](gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process), process, x_T, gen)
    assert_matches_mixture(x, process)


def test_pc_with_per_sample_step_sizes_reaches_gaussian_data() -> None:
    """Alg. 4-5's per-sample ||z|| / ||score|| in 64 dimensions. A step size that depends on x makes Langevin's
    stationary law p / eps(x), proportional to p ||score||^2: for N(m, s^2 I) the radius law goes from chi^2_D
    to chi^2_{D+2}, a variance bias of 2 / D (std +1.6% here) that vanishes for images but not in 2-D."""
    dim, n, std = 64, 2000, 0.3
    mean = torch.linspace(-0.5, 0.5, dim)
    process = VPSDE()
    gen = torch.Generator().manual_seed(2)
    x_T = process.prior_sample((n, dim), generator=gen)
    x = sample_pc(gaussian_denoiser(mean, torch.full((dim,), std), process), process, x_T,
                  grid=sde_times(process, 500), step_size_norm="sample", generator=gen)
    mean_err = ((x.mean(0) - mean).abs() / (std / math.sqrt(n))).max().item()
    pooled_std_err = abs(x.sub(x.mean(0)).pow(2).mean().sqrt().item() / std - 1)
    assert mean_err < 5, f"means off by {mean_err} standard errors"
    assert pooled_std_err < 5 / math.sqrt(2 * n * dim) + STD_ALLOWANCE, f"std off by {pooled_std_err:.3f}"


@pytest.mark.parametrize("process_cls", [VPSDE, VESDE], ids=["vp", "ve"])
def test_encode_then_decode_recovers_the_input(process_cls: type[SDEProcess]) -> None:
    """The probability-flow ODE is a bijection: rk45 with tight tolerances inverts itself (float64)."""
    process = process_cls()
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    gen = torch.Generator().manual_seed(3)
    labels = torch.multinomial(WEIGHTS, 64, replacement=True, generator=gen)
    x0 = (MEANS[labels] + STDS[labels, None] * torch.randn(64, 2, generator=gen)).double()
    stats: dict[str, int] = {}
    latent = encode_ode(den, process, x0, rtol=1e-8, atol=1e-8, stats=stats)
    decoded = sample_ode(den, process, latent, method="rk45", rtol=1e-8, atol=1e-8, denoise_final=False)
    assert latent.dtype == torch.float64 and stats["nfe"] > 0
    assert (latent.std() / process.sigma(torch.ones(1)).item() - 1).abs() < 0.5
    torch.testing.assert_close(decoded, x0, rtol=0, atol=1e-5)


def test_rk45_solves_a_closed_form_ode_in_both_directions() -> None:
    """dx/dt = -2 t x has x(t) = x(t0) exp(t0^2 - t^2); the error is at the tolerance and the statistics add up."""
    x0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    fn = lambda x, t: -2 * t[:, None] * x  # noqa: E731
    for t0, t1 in ((0.0, 2.0), (2.0, 0.0)):
        stats: dict[str, int] = {}
        x1 = integrate_ode(fn, x0, t0, t1, method="rk45", rtol=1e-8, atol=1e-10, stats=stats)
        torch.testing.assert_close(x1, x0 * math.exp(t0**2 - t1**2), rtol=1e-6, atol=1e-9)
        assert stats["nfe"] == 2 + 6 * (stats["steps"] + stats["rejected"])
        assert 5 < stats["steps"] < 500


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_fixed_step_methods_converge_at_their_order(method: str, order: int) -> None:
    x0 = torch.ones(1, 1, dtype=torch.float64)
    fn = lambda x, t: -2 * t[:, None] * x  # noqa: E731
    errors = [abs(integrate_ode(fn, x0, 0.0, 1.0, method=method, steps=s).item() - math.exp(-1)) for s in (20, 40)]
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


def test_samplers_are_seeded_and_ode_is_deterministic() -> None:
    process = VPSDE()
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    x_T = process.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    grid = sde_times(process, 20)
    runs = [sample_euler_maruyama(den, process, x_T, grid=grid, generator=torch.Generator().manual_seed(s))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    pcs = [sample_pc(den, process, x_T, grid=grid, generator=torch.Generator().manual_seed(s)) for s in (5, 5)]
    assert torch.equal(pcs[0], pcs[1])
    odes = [sample_ode(den, process, x_T, grid=grid, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    assert torch.equal(odes[0], odes[1])


def test_denoise_final_returns_the_tweedie_estimate() -> None:
    """Without the final denoising step the output keeps VE's residual noise sigma(t_min) ~ sigma_min."""
    process = VESDE(sigma_min=0.05)
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    x_T = process.prior_sample((N, 2), generator=torch.Generator().manual_seed(4))
    noisy = sample_ode(den, process, x_T, method="heun", grid=sde_times(process, 100), denoise_final=False)
    clean = den(noisy, torch.full((N,), process.t_min)).x0
    torch.testing.assert_close(sample_ode(den, process, x_T, method="heun", grid=sde_times(process, 100)), clean)
    labels = torch.cdist(clean, MEANS).argmin(1)
    var_added = noisy[labels == 0].var(0) - clean[labels == 0].var(0)
    assert bool((var_added > 0.5 * 0.05**2).all())


def test_rejects_bad_arguments() -> None:
    process = VPSDE()
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unknown predictor"):
        sample_pc(den, process, x, grid=sde_times(process, 10), predictor="langevin")
    with pytest.raises(ValueError, match="step_size_norm"):
        sample_pc(den, process, x, grid=sde_times(process, 10), step_size_norm="global")
    with pytest.raises(ValueError, match="unknown ODE method"):
        sample_ode(den, process, x, grid=sde_times(process, 10), method="rk4")
    with pytest.raises(ValueError, match="at least 1"):
        sample_euler_maruyama(den, process, x, grid=sde_times(process, 0))


@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_log_snr_grid_takes_equal_log_snr_steps(process: SDEProcess) -> None:
    """From t_max to t_min, strictly decreasing, with log(alpha^2 / sigma^2) rising by the same amount each step;
    "uniform" is the plain linspace."""
    times = sde_times(process, 12, "log_snr").tolist()
    assert len(times) == 13 and (times[0], times[-1]) == (process.t_max, process.t_min)
    assert all(a > b for a, b in zip(times[:-1], times[1:]))
    t = torch.tensor(times, dtype=torch.float64)
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    increments = torch.diff(snr.log())
    torch.testing.assert_close(increments, torch.full_like(increments, float(snr[-1].log() - snr[0].log()) / 12),
                               rtol=1e-9, atol=1e-9)
    uniform = torch.linspace(process.t_max, process.t_min, 5, dtype=torch.float64).tolist()
    assert sde_times(process, 4).tolist() == uniform
    with pytest.raises(ValueError, match="log_snr"):
        sde_times(process, 4, "karras")  # type: ignore[arg-type]


@pytest.mark.parametrize("s", [0.02, 0.1])
def test_log_snr_grid_follows_a_narrow_gaussian_more_closely(s: float) -> None:
    """Data N(0, s^2) with a small s: the probability-flow ODE maps x(1) to x(t_min) = x(1) sqrt(v(t_min) / v(1)),
    v = alpha^2 s^2 + sigma^2, and most of that change happens near t_min. With the exact denoiser and 20 Heun
    steps, the log-SNR grid lands more than ten times closer than the uniform one."""
    process = VPSDE()
    den = gaussian_denoiser(torch.zeros(1, dtype=torch.float64), torch.full((1,), s, dtype=torch.float64), process)
    x1 = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64)[:, None]
    ends = torch.tensor([process.t_min, process.t_max], dtype=torch.float64)
    variance = process.alpha(ends) ** 2 * s**2 + process.sigma(ends) ** 2
    exact = x1 * (variance[0] / variance[1]).sqrt()
    errors = {spacing: (sample_ode(den, process, x1, method="heun", grid=sde_times(process, 20, spacing),
                                   denoise_final=False) - exact).abs().max().item()
              for spacing in ("uniform", "log_snr")}
    assert errors["log_snr"] < 0.1 * errors["uniform"]
    assert errors["log_snr"] < 0.1 * exact.abs().max().item()


@pytest.mark.parametrize("sampler", [sample_euler_maruyama, functools.partial(sample_pc, step_size_norm="batch")],
                         ids=["euler_maruyama", "pc"])
def test_sde_samplers_on_the_log_snr_grid_sample_the_data(sampler: Callable[..., torch.Tensor]) -> None:
    """The stochastic samplers take the log-SNR grid too: exact denoiser of N(0.3, 0.5^2), 100 steps, 20000
    samples; mean and standard deviation within 4 standard errors plus the discretization bias (the corrector
    normalizes over the batch: per-sample score norms of 1-D samples can be near 0)."""
    process = VPSDE()
    den = gaussian_denoiser(torch.full((1,), 0.3), torch.full((1,), 0.5), process)
    generator = torch.Generator().manual_seed(0)
    x1 = process.prior_sample((20_000, 1), generator=generator)
    samples = sampler(den, process, x1, grid=sde_times(process, 100, "log_snr"), generator=generator)
    assert abs(samples.mean().item() - 0.3) < 4 * 0.5 / math.sqrt(20_000) + 0.01
    assert abs(samples.std().item() - 0.5) < 4 * 0.5 / math.sqrt(2 * 20_000) + 0.01


@pytest.mark.parametrize("process_cls", [VPSDE, VESDE], ids=["vp", "ve"])
def test_pc_with_per_sample_step_sizes_stays_bounded_in_two_dimensions(process_cls: type[SDEProcess]) -> None:
    """Alg. 4-5's per-sample step eps_i = 2 alpha_i (snr ||z|| / ||score||)^2 in 2-D, where ||score|| is often
    near 0: on the noised mixture at t = 0.5 the unfloored step exceeds the cap 2 alpha_i sigma^2 more than 100-fold
    for some samples, and without the cap PC's default options threw samples to |x| ~ 20-50. With it every sample is
    finite and within the data's range, and the components sit at their means.

    Their spread and weights stay biased in 2-D (std about 1.5x, weight 0.38 for 0.3): a step size that depends
    on x and z changes Langevin's stationary law by O(2 / D) (see the 64-D test above); step_size_norm="batch"
    samples the mixture (test_sampler_reaches_gaussian_mixture)."""
    process = process_cls()
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    gen = torch.Generator().manual_seed(7)
    labels = torch.multinomial(WEIGHTS, N, replacement=True, generator=gen)
    t = torch.full((N,), 0.5)
    x_t = process.add_noise(MEANS[labels] + STDS[labels, None] * torch.randn(N, 2, generator=gen), t,
                            torch.randn(N, 2, generator=gen))
    score_norm = (den(x_t, t).eps / process.sigma(t)[:, None]).norm(dim=1)
    unfloored_over_cap = (0.16 * torch.randn(N, 2, generator=gen).norm(dim=1) / (process.sigma(t) * score_norm)) ** 2
    assert unfloored_over_cap.max().item() > 100

    x = sample_pc(den, process, process.prior_sample((N, 2), generator=gen), grid=sde_times(process, 200),
                  generator=gen)
    assert bool(torch.isfinite(x).all()) and x.abs().max().item() < 1 + 10 * STDS.max().item()
    nearest = torch.cdist(x, MEANS).argmin(1)
    for k in range(len(WEIGHTS)):
        xs = x[nearest == k]
        assert (xs.mean(0) - MEANS[k]).abs().max().item() < 5 * 2 * STDS[k].item() / math.sqrt(len(xs)) + MEAN_ALLOWANCE


def sde_sample(sampler: str, den: DenoiseFn, process: SDEProcess, x: torch.Tensor, grid: torch.Tensor,
               project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """One of the SDE/ODE samplers on ``grid`` with a seeded generator and an optional projection."""
    gen = torch.Generator().manual_seed(8)
    if sampler == "euler_maruyama":
        return sample_euler_maruyama(den, process, x, grid=grid, generator=gen, project=project)
    if sampler == "pc":
        return sample_pc(den, process, x, grid=grid, corrector_steps=2, generator=gen, project=project)
    return sample_ode(den, process, x, grid=grid, method=sampler.removeprefix("ode_"), project=project)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc", "ode_euler", "ode_heun"])
def test_projection_after_every_step(sampler: str) -> None:
    """project(x, t) runs after every step (PC: after the predictor and after each corrector step) with the (B,)
    time just reached, then at t = 0 after the final denoising; a coordinate it fixes ends at its value. An
    identity projection changes nothing, bit for bit."""
    process = VPSDE()
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    x_T = process.prior_sample((64, 2), generator=torch.Generator().manual_seed(9))
    grid = sde_times(process, 10)
    times: list[torch.Tensor] = []

    def project(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times.append(t)
        return torch.stack([torch.full_like(x[:, 0], 0.25), x[:, 1]], dim=1)

    projected = sde_sample(sampler, den, process, x_T, grid, project)
    visits = 3 if sampler == "pc" else 1
    expected = [t for t in grid[1:].tolist() for _ in range(visits)] + [0.0]
    assert [t[0].item() for t in times] == pytest.approx(expected) and all(t.shape == (64,) for t in times)
    assert bool((projected[:, 0] == 0.25).all())
    assert torch.equal(sde_sample(sampler, den, process, x_T, grid, lambda x, t: x),
                       sde_sample(sampler, den, process, x_T, grid, None))


def test_ode_sampler_grid_rules() -> None:
    """Fixed-step methods need a grid; rk45 takes only its end points and refuses a per-step projection."""
    process = VPSDE()
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    x = process.prior_sample((8, 2), generator=torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match="needs a grid"):
        sample_ode(den, process, x, method="heun")
    with pytest.raises(ValueError, match="fixed-step ODE method"):
        sample_ode(den, process, x, method="rk45", project=lambda x, t: x)
    ends = torch.tensor([process.t_max, process.t_min], dtype=torch.float64)
    assert torch.equal(sample_ode(den, process, x, method="rk45", grid=ends),
                       sample_ode(den, process, x, method="rk45"))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler_maruyama(den, process, x, grid=sde_times(process, 10).flip(0))


def test_sde_grid_starting_below_t_max_continues_from_the_marginal() -> None:
    """Euler–Maruyama from the exact noised mixture at t = 0.3 down a grid that starts there reaches the data."""
    process = VPSDE()
    gen = torch.Generator().manual_seed(11)
    labels = torch.multinomial(WEIGHTS, N, replacement=True, generator=gen)
    x0 = MEANS[labels] + STDS[labels, None] * torch.randn(N, 2, generator=gen)
    x_start = process.add_noise(x0, torch.full((N,), 0.3), torch.randn(N, 2, generator=gen))
    grid = torch.linspace(0.3, process.t_min, 151, dtype=torch.float64)
    x = sample_euler_maruyama(gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process), process, x_start, grid=grid,
                              generator=gen)
    assert_matches_mixture(x, process)
