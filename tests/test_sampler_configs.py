"""Typed sampler configurations: process checks, default grids, respacing, sampling, hparams, YAML construction;
and DDIM on an SDE process against the exact law of its chain for Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from analytic import ConstantProcess, gaussian_denoiser
from jsonargparse import ArgumentParser
from torch import Tensor

from diffusion_pl.core.spec import spec_of
from diffusion_pl.models.hparams import flatten
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes import (
    VESDE,
    VPSDE,
    DiscreteProcess,
    ForwardProcess,
    SubVPSDE,
)
from diffusion_pl.samplers import (
    DDIM,
    DDPM,
    ODE,
    EulerMaruyama,
    PredictorCorrector,
    Sampler,
    append_zero,
    ddpm_grid,
    sample_ddim,
    sample_ddpm,
    sample_euler_maruyama,
    sample_ode,
    sample_pc,
    sde_times,
    strided_grid,
    strided_steps,
)

MEAN = torch.tensor([0.5, -0.3, 0.0])
STD = torch.tensor([0.2, 0.5, 1.0])
SDE_SAMPLERS = (EulerMaruyama(), PredictorCorrector(), ODE())


def test_check_accepts_the_processes_each_sampler_runs_on() -> None:
    discrete, sdes = DiscreteProcess(100), (VPSDE(), SubVPSDE(), VESDE())
    DDPM().check(discrete)
    DDPM(steps=100).check(discrete)
    DDIM(steps=100).check(discrete)
    for process in sdes:
        DDIM().check(process)
        for sampler in SDE_SAMPLERS:
            sampler.check(process)


def test_check_refuses_with_what_to_use_instead() -> None:
    discrete = DiscreteProcess(100)
    with pytest.raises(ValueError, match="DDPM samples a DiscreteProcess, got VPSDE; for an SDE process use DDIM"):
        DDPM().check(VPSDE())
    for sampler in SDE_SAMPLERS:
        with pytest.raises(ValueError, match=f"{type(sampler).__name__} .* needs an SDEProcess .* got DiscreteProcess; "
                                             "for a DiscreteProcess use DDPM or DDIM"):
            sampler.check(discrete)
    with pytest.raises(ValueError, match=r"DDPM\(steps=101\) exceeds the process's T=100 steps"):
        DDPM(steps=101).check(discrete)
    with pytest.raises(ValueError, match=r"DDIM\(steps=101\) exceeds the process's T=100 steps"):
        DDIM(steps=101).check(discrete)
    with pytest.raises(ValueError, match="DDIM builds its grid on a DiscreteProcess or an SDEProcess, got "
                                         "ConstantProcess; pass an explicit grid to sample_ddim"):
        DDIM().check(ConstantProcess())
    den = gaussian_denoiser(MEAN, STD, discrete)
    with pytest.raises(ValueError, match="needs an SDEProcess"):
        EulerMaruyama(steps=5).sample(den, discrete, torch.zeros(2, 3))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: DDPM(steps=0), "positive number of steps or None"),
    (lambda: DDPM(variance="learned"), "unknown DDPM variance"),  # type: ignore[arg-type]
    (lambda: DDIM(steps=0), "at least 1"),
    (lambda: DDIM(eta=1.5), "eta must be in"),
    (lambda: DDIM(spacing="karras"), "unknown time spacing"),  # type: ignore[arg-type]
    (lambda: EulerMaruyama(steps=0), "at least 1"),
    (lambda: PredictorCorrector(predictor="langevin"), "unknown predictor"),  # type: ignore[arg-type]
    (lambda: PredictorCorrector(snr=0.0), "snr > 0"),
    (lambda: PredictorCorrector(corrector_steps=-1), "corrector_steps >= 0"),
    (lambda: PredictorCorrector(step_size_norm="global"), "step_size_norm"),  # type: ignore[arg-type]
    (lambda: ODE(method="rk4"), "unknown ODE method"),  # type: ignore[arg-type]
    (lambda: ODE(rtol=0.0), "tolerances must be positive"),
])
def test_arguments_are_validated_on_construction(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        make()


def test_default_grids() -> None:
    discrete, vp = DiscreteProcess(1000), VPSDE()
    assert torch.equal(DDIM(steps=4).grid(discrete), torch.tensor([1000, 750, 500, 250, 0]))
    assert torch.equal(DDIM(steps=4).grid(discrete), strided_grid(1000, 4))
    ddim_sde = DDIM(steps=4, spacing="log_snr").grid(vp)
    assert ddim_sde.dtype == torch.float64 and ddim_sde[-1].item() == 0.0
    assert torch.equal(ddim_sde, append_zero(sde_times(vp, 4, "log_snr")))
    assert torch.equal(DDPM().grid(discrete), torch.arange(1000, 0, -1))
    assert torch.equal(EulerMaruyama(steps=7).grid(vp), sde_times(vp, 7))
    assert torch.equal(PredictorCorrector(steps=7, spacing="log_snr").grid(vp), sde_times(vp, 7, "log_snr"))
    assert torch.equal(ODE(steps=7).grid(vp), sde_times(vp, 7))
    assert ODE(method="rk45").grid(vp).tolist() == [vp.t_max, vp.t_min]


def test_ddpm_steps_respace_the_process() -> None:
    process = DiscreteProcess(1000, "cosine")
    assert DDPM().sampling_process(process) is process and DDPM(steps=1000).sampling_process(process) is process
    assert DDIM(steps=10).sampling_process(process) is process
    respaced = DDPM(steps=10).sampling_process(process)
    expected = process.respace(strided_steps(1000, 10).tolist())
    assert respaced.num_steps == 10
    torch.testing.assert_close(respaced.alphas_cumprod, expected.alphas_cumprod, rtol=0, atol=0)
    assert respaced.timestep_map.tolist() == [0, *range(100, 1001, 100)]
    assert torch.equal(DDPM(steps=10).grid(respaced), torch.arange(10, 0, -1))
    with pytest.raises(ValueError, match=r"pass sampler.sampling_process\(process\)"):
        DDPM(steps=10).sample(gaussian_denoiser(MEAN, STD, process), process, torch.zeros(2, 3))


def discrete_cases() -> list[tuple[Sampler, DenoiseFn, ForwardProcess, Tensor]]:
    process = DiscreteProcess(100, "cosine")
    x_T = process.prior_sample((16, 3), generator=torch.Generator().manual_seed(0))
    cases = []
    for sampler in (DDPM(), DDPM(steps=10, variance="posterior"), DDIM(steps=10), DDIM(steps=7, eta=1.0)):
        sampling = sampler.sampling_process(process)
        cases.append((sampler, gaussian_denoiser(MEAN, STD, sampling), sampling, x_T))
    return cases


def test_sample_equals_the_sampling_function() -> None:
    """Each config calls its function with its options and default grid: same numbers, bit for bit."""
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(1)

    for sampler, den, process, x_T in discrete_cases():
        if isinstance(sampler, DDPM):
            direct = sample_ddpm(den, process, x_T, variance=sampler.variance, generator=gen())
        else:
            direct = sample_ddim(den, process, x_T, grid=strided_grid(100, sampler.steps), eta=sampler.eta,
                                 generator=gen())
        assert torch.equal(sampler.sample(den, process, x_T, generator=gen()), direct), sampler
    vp = VPSDE()
    den = gaussian_denoiser(MEAN, STD, vp)
    x_T = vp.prior_sample((16, 3), generator=torch.Generator().manual_seed(2))
    pairs = [
        (DDIM(steps=10, eta=0.5), sample_ddim(den, vp, x_T, grid=append_zero(sde_times(vp, 10)), eta=0.5,
                                              generator=gen())),
        (EulerMaruyama(steps=20, spacing="log_snr", denoise_final=False),
         sample_euler_maruyama(den, vp, x_T, grid=sde_times(vp, 20, "log_snr"), generator=gen(), denoise_final=False)),
        (PredictorCorrector(steps=20, predictor="euler_maruyama", corrector_steps=2, snr=0.1, step_size_norm="batch"),
         sample_pc(den, vp, x_T, grid=sde_times(vp, 20), predictor="euler_maruyama", corrector_steps=2, snr=0.1,
                   step_size_norm="batch", generator=gen())),
        (ODE(method="euler", steps=20), sample_ode(den, vp, x_T, grid=sde_times(vp, 20), method="euler")),
        (ODE(method="rk45", rtol=1e-3, atol=1e-3), sample_ode(den, vp, x_T, method="rk45", rtol=1e-3, atol=1e-3)),
    ]
    for sampler, direct in pairs:
        assert torch.equal(sampler.sample(den, vp, x_T, generator=gen()), direct), sampler


def test_sample_takes_an_explicit_grid_and_projection() -> None:
    """A grid starting below T (SDEdit) replaces the default one; the projection reaches the function."""
    process = DiscreteProcess(100, "cosine")
    den = gaussian_denoiser(MEAN, STD, process)
    x = process.prior_sample((16, 3), generator=torch.Generator().manual_seed(3))
    grid = strided_grid(100, 10)[5:]
    set_first = lambda x, t: torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], dim=1)  # noqa: E731
    out = DDIM(steps=10).sample(den, process, x, grid=grid, project=set_first)
    assert torch.equal(out, sample_ddim(den, process, x, grid=grid, project=set_first))
    assert bool((out[:, 0] == 0).all())
    start = ddpm_grid(100, 30)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.equal(DDPM().sample(den, process, x, grid=start, generator=gen()),
                       sample_ddpm(den, process, x, grid=start, generator=gen()))


def test_hparams_and_repr() -> None:
    """What TensorBoard's HPARAMS view shows of a sampler: its spec, flattened."""

    def hparams(sampler: Sampler) -> dict:
        return flatten(spec_of(sampler), "sampler")

    assert hparams(DDIM(steps=50)) == {"sampler": "DDIM", "sampler/steps": 50, "sampler/eta": 0.0,
                                        "sampler/spacing": "uniform"}
    assert hparams(DDPM()) == {"sampler": "DDPM", "sampler/variance": "beta"}
    assert hparams(PredictorCorrector(steps=10)) == {
        "sampler": "PredictorCorrector", "sampler/steps": 10, "sampler/spacing": "uniform",
        "sampler/predictor": "reverse_diffusion", "sampler/corrector_steps": 1, "sampler/snr": 0.16,
        "sampler/step_size_norm": "sample", "sampler/denoise_final": True}
    for sampler in (DDPM(steps=3), *SDE_SAMPLERS):
        assert all(isinstance(v, (int, float, str, bool)) for v in hparams(sampler).values())
    assert repr(ODE(method="rk45")) == ("ODE(method='rk45', steps=100, spacing='uniform', rtol=1e-05, atol=1e-05, "
                                        "denoise_final=True)")


def test_built_from_yaml_by_jsonargparse() -> None:
    """LightningCLI's route: a ``class_path``/``init_args`` mapping for an argument typed ``Sampler``."""
    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    config = parser.parse_string("sampler:\n  class_path: diffusion_pl.samplers.DDIM\n  init_args:\n    steps: 50\n")
    sampler = parser.instantiate_classes(config).sampler
    assert isinstance(sampler, DDIM) and (sampler.steps, sampler.eta, sampler.spacing) == (50, 0.0, "uniform")
    config = parser.parse_string("sampler:\n  class_path: diffusion_pl.samplers.PredictorCorrector\n  init_args:\n"
                                 "    snr: 0.1\n    step_size_norm: batch\n")
    sampler = parser.instantiate_classes(config).sampler
    assert isinstance(sampler, PredictorCorrector) and (sampler.snr, sampler.step_size_norm) == (0.1, "batch")
    with pytest.raises(ValueError, match="eta must be in"):
        parser.instantiate_classes(parser.parse_string(
            "sampler:\n  class_path: diffusion_pl.samplers.DDIM\n  init_args:\n    eta: 2.0\n"))


def ddim_exact_law(process: ForwardProcess, grid: Tensor, eta: float, prior_std: float) -> tuple[Tensor, Tensor]:
    """Per-dimension mean/std of DDIM's output on ``grid`` for x0 ~ N(MEAN, STD^2), by moment recursion in float64.

    With the exact Gaussian denoiser each step (Song et al. 2021a, eq. 12) is affine in x plus independent noise:
    x0_hat = m + g (x - a_t m) with g = a_t v / (a_t^2 v + s_t^2) and eps_hat = (x - a_t x0_hat) / s_t, so the
    output law is Gaussian and its moments follow from alpha and sigma alone."""
    mean, var = torch.zeros(3, dtype=torch.float64), torch.full((3,), prior_std**2, dtype=torch.float64)
    m, v = MEAN.double(), STD.double() ** 2

    def coefficients(time: Tensor) -> tuple[Tensor, Tensor]:
        return process.alpha(time[None])[0].double(), process.sigma(time[None])[0].double()

    times = grid.double()
    for t, s in zip(times[:-1], times[1:]):
        (a_t, s_t), (a_s, s_s) = coefficients(t), coefficients(s)
        gain = a_t * v / (a_t**2 * v + s_t**2)
        noise_std = eta * (s_s / s_t) * (1 - (a_t / a_s) ** 2).clamp(min=0).sqrt()
        d = (s_s**2 - noise_std**2).clamp(min=0).sqrt()
        centred = (1 - gain * a_t) * m  # x0_hat = gain x + centred, eps_hat = ((1 - a_t gain) x - a_t centred) / s_t
        slope = a_s * gain + d * (1 - a_t * gain) / s_t
        offset = a_s * centred - d * a_t * centred / s_t
        mean, var = slope * mean + offset, slope**2 * var + noise_std**2
    return mean.float(), var.sqrt().float()


def assert_matches_gaussian(x: Tensor, mean: Tensor, std: Tensor, n_sigma: float = 5.0) -> None:
    """Sample mean and std agree with N(mean, std^2) within n_sigma standard errors for this sample size."""
    n = x.shape[0]
    mean_err = (x.mean(0) - mean).abs() / (std / math.sqrt(n))
    std_err = (x.std(0) - std).abs() / (std / math.sqrt(2 * n))
    assert bool((mean_err < n_sigma).all()), f"means off by {mean_err.tolist()} standard errors"
    assert bool((std_err < n_sigma).all()), f"stds off by {std_err.tolist()} standard errors"


def prior_std(process: ForwardProcess) -> float:
    """The prior's standard deviation: sigma_max for VE, 1 for VP and sub-VP."""
    return process.sigma_max if isinstance(process, VESDE) else 1.0


SDE_DDIM_CASES = [(VPSDE, 0.0), (VPSDE, 1.0), (SubVPSDE, 0.0), (VESDE, 0.0)]
SDE_DDIM_IDS = ["vp-eta0", "vp-eta1", "subvp-eta0", "ve-eta0"]


@pytest.mark.parametrize(("process_cls", "eta"), SDE_DDIM_CASES, ids=SDE_DDIM_IDS)
def test_ddim_on_an_sde_samples_its_exact_law(process_cls: type[ForwardProcess], eta: float) -> None:
    """DDIM on an SDE process (float grid, last step to t = 0) with the exact denoiser of Gaussian data: 20000
    samples of the 50-step log-SNR chain match the chain's exact law from the moment recursion."""
    process = process_cls()
    gen = torch.Generator().manual_seed(5)
    sampler = DDIM(steps=50, eta=eta, spacing="log_snr")
    x = sampler.sample(gaussian_denoiser(MEAN, STD, process), process, process.prior_sample((20_000, 3), generator=gen),
                       generator=gen)
    assert_matches_gaussian(x, *ddim_exact_law(process, sampler.grid(process), eta, prior_std(process)))


@pytest.mark.parametrize(("process_cls", "eta"), SDE_DDIM_CASES, ids=SDE_DDIM_IDS)
def test_ddim_law_on_an_sde_converges_to_the_data(process_cls: type[ForwardProcess], eta: float) -> None:
    """The exact law of the chain approaches the data as the grid refines: the std's discretization bias falls
    with the steps, below 3% at 1000; the mean is off only by the prior's mismatch (x_1 ~ N(0, I) instead of
    N(alpha(1) m, ...), alpha(1) = 0.007). VE lands on x(0) = x0 + sigma_min eps, its convention."""
    process = process_cls()
    target_std = (STD**2 + process.sigma(torch.zeros(1)) ** 2).sqrt()
    errors = []
    for steps in (50, 200, 1000):
        mean, std = ddim_exact_law(process, DDIM(steps, eta, "log_snr").grid(process), eta, prior_std(process))
        assert (mean - MEAN).abs().max().item() < 0.005
        errors.append((std / target_std - 1).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03


@pytest.mark.parametrize("process", [SubVPSDE(), VESDE()], ids=["subvp", "ve"])
def test_ddim_refuses_eta_on_processes_that_do_not_preserve_variance(process: ForwardProcess) -> None:
    """Eq. 16's s_eta assumes alpha^2 + sigma^2 = 1: on sub-VP it can exceed sigma_s, on VE it is always 0."""
    den = gaussian_denoiser(MEAN, STD, process)
    with pytest.raises(ValueError, match="eta > 0 needs a variance-preserving process .* use eta=0"):
        DDIM(eta=0.5).check(process)
    with pytest.raises(ValueError, match="eta > 0 needs a variance-preserving process"):
        sample_ddim(den, process, torch.zeros(2, 3), grid=append_zero(sde_times(process, 5)), eta=0.5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_on_the_vp_sde_reproduces_the_data(eta: float) -> None:
    """DDIM(steps=1000, spacing="log_snr") on the VP SDE: the data's mean and std within 5 standard errors of
    20000 samples."""
    process = VPSDE()
    gen = torch.Generator().manual_seed(6)
    x = DDIM(steps=1000, eta=eta, spacing="log_snr").sample(
        gaussian_denoiser(MEAN, STD, process), process, process.prior_sample((20_000, 3), generator=gen), generator=gen)
    assert_matches_gaussian(x, MEAN, STD)
