"""Samplers driven by the exact denoiser of Gaussian data (no network): they must reach the data law."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from analytic import gaussian_denoiser
from diffusion_pl.processes import DiscreteProcess
from diffusion_pl.samplers import ddpm_grid, sample_ddim, sample_ddpm, strided_grid, strided_steps

MEAN = torch.tensor([0.5, -0.3, 0.0])
STD = torch.tensor([0.2, 0.5, 1.0])
N = 20_000


def assert_matches_gaussian(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n_sigma: float = 5.0) -> None:
    """Sample mean and std agree with N(mean, std^2) within n_sigma standard errors for this sample size."""
    n = x.shape[0]
    mean_err = (x.mean(0) - mean).abs() / (std / math.sqrt(n))
    std_err = (x.std(0) - std).abs() / (std / math.sqrt(2 * n))
    assert bool((mean_err < n_sigma).all()), f"means off by {mean_err.tolist()} standard errors"
    assert bool((std_err < n_sigma).all()), f"stds off by {std_err.tolist()} standard errors"


def ddim_exact_law(process: DiscreteProcess, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean/std of the S-step DDIM chain's output for the Gaussian data, by moment recursion.

    With the exact Gaussian denoiser every DDIM step (Song et al. 2021a, eq. 12) is affine in x plus
    independent Gaussian noise, so the output law is Gaussian; propagate its mean and variance in float64.
    """
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    m, v = MEAN.double(), STD.double() ** 2
    ab = process.alphas_cumprod.double()
    grid = strided_steps(process.num_steps, steps).tolist()
    for t, s in zip(reversed(grid), reversed([0] + grid[:-1])):
        a_t, s_t, a_s, s_s = ab[t].sqrt(), (1 - ab[t]).sqrt(), ab[s].sqrt(), (1 - ab[s]).sqrt()
        gain = a_t * v / (a_t**2 * v + s_t**2)
        c0 = (1 - gain * a_t) * m
        noise_std = eta * (s_s / s_t) * (1 - ab[t] / ab[s]).sqrt()
        d = (s_s**2 - noise_std**2).clamp(min=0).sqrt()
        slope = a_s * gain + d * (1 - a_t * gain) / s_t
        offset = a_s * c0 - d * a_t * c0 / s_t
        mean, var = slope * mean + offset, slope**2 * var + noise_std**2
    return mean.float(), var.sqrt().float()


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_reaches_gaussian_data(variance: str, schedule: str) -> None:
    process = DiscreteProcess(1000, schedule)
    gen = torch.Generator().manual_seed(0)
    x_T = process.prior_sample((N, 3), generator=gen)
    x = sample_ddpm(gaussian_denoiser(MEAN, STD, process), process, x_T, variance=variance, generator=gen)
    assert_matches_gaussian(x, MEAN, STD)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_50_steps_samples_its_exact_law(eta: float, schedule: str) -> None:
    process = DiscreteProcess(1000, schedule)
    gen = torch.Generator().manual_seed(1)
    x_T = process.prior_sample((N, 3), generator=gen)
    x = sample_ddim(gaussian_denoiser(MEAN, STD, process), process, x_T, grid=strided_grid(1000, 50), eta=eta,
                    generator=gen)
    mean, std = ddim_exact_law(process, 50, eta)
    assert_matches_gaussian(x, mean, std)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_law_converges_to_data(eta: float) -> None:
    """The discretization bias of the 50-step chain is small and vanishes as the grid refines."""
    process = DiscreteProcess(1000, "cosine")
    errors = []
    for steps in (50, 200, 1000):
        mean, std = ddim_exact_law(process, steps, eta)
        errors.append(max((mean - MEAN).abs().max().item(), (std / STD - 1).abs().max().item()))
    assert errors[0] < 0.15 and errors[1] < 0.06 and errors[2] < 0.015
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reaches_data_with_fine_grid(eta: float) -> None:
    process = DiscreteProcess(1000, "cosine")
    gen = torch.Generator().manual_seed(2)
    x_T = process.prior_sample((N, 3), generator=gen)
    x = sample_ddim(gaussian_denoiser(MEAN, STD, process), process, x_T, grid=strided_grid(1000, 1000), eta=eta,
                    generator=gen)
    assert_matches_gaussian(x, MEAN, STD)


def test_ddim_eta0_is_deterministic_and_seeded() -> None:
    process = DiscreteProcess(1000, "linear")
    den = gaussian_denoiser(MEAN, STD, process)
    x_T = process.prior_sample((64, 3), generator=torch.Generator().manual_seed(3))
    grid = strided_grid(1000, 20)
    first = sample_ddim(den, process, x_T, grid=grid, generator=torch.Generator().manual_seed(0))
    second = sample_ddim(den, process, x_T, grid=grid, generator=torch.Generator().manual_seed(99))
    assert torch.equal(first, second)
    seeded = [sample_ddim(den, process, x_T, grid=grid, eta=1.0, generator=torch.Generator().manual_seed(s))
              for s in (5, 5, 6)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])


def test_ddim_rejects_bad_arguments() -> None:
    process = DiscreteProcess(100, "linear")
    den = gaussian_denoiser(MEAN, STD, process)
    with pytest.raises(ValueError, match="between 1 and T=100"):
        sample_ddim(den, process, torch.zeros(2, 3), grid=strided_grid(100, 101))
    with pytest.raises(ValueError, match="eta must be in"):
        sample_ddim(den, process, torch.zeros(2, 3), grid=strided_grid(100, 10), eta=1.5)


def test_strided_steps() -> None:
    assert strided_steps(1000, 4).tolist() == [250, 500, 750, 1000]
    assert strided_steps(10, 10).tolist() == list(range(1, 11))


def test_grids_of_the_discrete_samplers() -> None:
    """DDIM's grid is the strided sub-sequence reversed, landing on 0; DDPM's visits every step down to 1."""
    assert strided_grid(1000, 4).tolist() == [1000, 750, 500, 250, 0]
    assert strided_grid(1000, 4).dtype == torch.long
    assert ddpm_grid(5).tolist() == [5, 4, 3, 2, 1]
    assert ddpm_grid(1000, 3).tolist() == [3, 2, 1]
    with pytest.raises(ValueError, match="between 1 and T=5"):
        ddpm_grid(5, 6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_grid_starting_below_T_continues_from_the_marginal(sampler: str) -> None:
    """Started from the exact marginal q(x_300) (SDEdit's noised data), the chain from step 300 reaches the data."""
    process = DiscreteProcess(1000, "cosine")
    gen = torch.Generator().manual_seed(4)
    start = torch.full((N,), 300)
    x0 = MEAN + STD * torch.randn(N, 3, generator=gen)
    x_start = process.add_noise(x0, start, torch.randn(N, 3, generator=gen))
    den = gaussian_denoiser(MEAN, STD, process)
    if sampler == "ddpm":
        x = sample_ddpm(den, process, x_start, grid=ddpm_grid(1000, 300), generator=gen)
    else:
        grid = strided_grid(1000, 1000)
        x = sample_ddim(den, process, x_start, grid=grid[grid <= 300], eta=1.0, generator=gen)
    assert_matches_gaussian(x, MEAN, STD)


def test_discrete_samplers_reject_bad_grids() -> None:
    process = DiscreteProcess(100, "linear")
    den = gaussian_denoiser(MEAN, STD, process)
    x = torch.zeros(2, 3)
    for grid in (torch.tensor([100, 98, 1]), torch.tensor([3, 2]), torch.tensor([101, 100]), ddpm_grid(100).float(),
                 torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="consecutive integer steps"):
            sample_ddpm(den, process, x, grid=grid)
    for grid in (torch.tensor([10, 20, 0]), torch.tensor([10, 10, 0]), torch.tensor([5, -1]), torch.tensor([5]),
                 strided_grid(100, 5)[None]):
        with pytest.raises(ValueError, match="DDIM needs"):
            sample_ddim(den, process, x, grid=grid)


KNOWN = 0.25


def known_first_coordinate(times: list[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A projection that sets coordinate 0 to KNOWN (inpainting by replacement) and records the times it gets."""

    def project(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times.append(t)
        x = x.clone()
        x[:, 0] = KNOWN
        return x

    return project


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1"])
def test_projection_after_every_step(sampler: str) -> None:
    """project(x, t) runs after every step with the (B,) time just reached and its result is what the next step
    sees: the known coordinate ends exactly at its value. An identity projection changes nothing, bit for bit."""
    process = DiscreteProcess(100, "linear")
    den = gaussian_denoiser(MEAN, STD, process)
    x_T = process.prior_sample((256, 3), generator=torch.Generator().manual_seed(5))
    grid = ddpm_grid(100) if sampler == "ddpm" else strided_grid(100, 10)
    eta = 1.0 if sampler == "ddim_eta1" else 0.0

    def run(project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(6)
        if sampler == "ddpm":
            return sample_ddpm(den, process, x_T, grid=grid, generator=gen, project=project)
        return sample_ddim(den, process, x_T, grid=grid, eta=eta, generator=gen, project=project)

    times: list[torch.Tensor] = []
    projected = run(known_first_coordinate(times))
    reached = (grid - 1).tolist() if sampler == "ddpm" else grid[1:].tolist()
    assert [int(t[0]) for t in times] == reached and all(t.shape == (256,) for t in times)
    assert bool((projected[:, 0] == KNOWN).all())
    assert torch.equal(run(lambda x, t: x), run(None))
