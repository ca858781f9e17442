"""Zero terminal SNR (Lin et al. 2024, Alg. 1): the rescaled schedule in closed form, and everything downstream of
alpha-bar_T = 0 (v-prediction, samplers from pure noise at T, log-SNR grids, guidance, loss weightings)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import DDPM_FASHION, cli_args, run_cli
from test_samplers import MEAN, STD, N, assert_matches_gaussian, ddim_exact_law
from torch import Tensor, nn

from diffusion_pl.cli.main import main
from diffusion_pl.core.errors import ConfigError
from diffusion_pl.guidance import classifier_guidance, combine_guided
from diffusion_pl.loss_parts import EDMWeighting, MinSNR
from diffusion_pl.parameterization import EDM, X0, Denoiser, Eps, LearnedVariance, Prediction, V, Velocity
from diffusion_pl.processes import DiscreteProcess
from diffusion_pl.samplers import (
    DDPM,
    DPMSolverPP,
    DPMSolverPPSDE,
    EDMStochastic,
    Euler,
    Heun,
    Karras,
    LogSNR,
    Trailing,
    sample_ddim,
    strided_grid,
)

T = 1000


def zero_snr(schedule: str, num_steps: int = T) -> DiscreteProcess:
    return DiscreteProcess(num_steps, schedule, zero_terminal_snr=True)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_T_is_exactly_zero_and_alpha_bar_1_is_kept(schedule: str) -> None:
    process, original = zero_snr(schedule), DiscreteProcess(T, schedule)
    assert float(process.alphas_cumprod_64[T]) == 0.0 and float(process.alphas_cumprod[T]) == 0.0
    assert float(process.betas[T]) == 1.0
    assert float(process.alphas_cumprod_64[1]) == pytest.approx(float(original.alphas_cumprod_64[1]), rel=1e-14)
    t = torch.tensor([T])
    assert float(process.alpha(t)) == 0.0 and float(process.sigma(t)) == 1.0
    assert float(process.alpha(t.double())) == 0.0 and float(process.sigma(t.double())) == 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sqrt_alpha_bar_is_alg1_shift_and_scale(schedule: str) -> None:
    """sqrt(alpha-bar'_t) = (sqrt(alpha-bar_t) - sqrt(alpha-bar_T)) sqrt(alpha-bar_1) / (sqrt(alpha-bar_1) -
    sqrt(alpha-bar_T)) of the original schedule's float64 alpha-bar, t = 1..T (Lin et al. 2024, Alg. 1)."""
    root = DiscreteProcess(T, schedule).alphas_cumprod_64[1:].sqrt()
    expected = (root - root[-1]) * root[0] / (root[0] - root[-1])
    rescaled = zero_snr(schedule).alphas_cumprod_64[1:].sqrt()
    torch.testing.assert_close(rescaled, expected, rtol=1e-12, atol=1e-15)
    assert float(root[-1]) > 0 and float(rescaled[-1]) == 0.0  # the rescaling moved the schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_log_snr_is_finite_and_decreasing_before_T_and_minus_infinity_at_T(schedule: str) -> None:
    process = zero_snr(schedule)
    steps = process.log_snr(torch.arange(1, T + 1, dtype=torch.float64))
    assert bool(torch.isfinite(steps[:-1]).all()) and float(steps[-1]) == -math.inf
    assert bool((steps[:-1].diff() < 0).all())
    # between T - 1 and T, alpha / sigma falls linearly to 0: lambda = lambda_{T-1} + 2 log(T - t)
    t = torch.tensor([T - 1, T - 0.75, T - 0.5, T - 0.25, T], dtype=torch.float64)
    top = process.log_snr(t)
    torch.testing.assert_close(top[:-1], steps[-2] + 2 * (T - t[:-1]).log())
    torch.testing.assert_close((0.5 * top).exp(), (T - t) * math.exp(0.5 * float(steps[-2])))


def test_the_prior_is_the_marginal_at_T() -> None:
    process = zero_snr("linear")
    x0, eps, t = torch.randn(16, 3), torch.randn(16, 3), torch.full((16,), T)
    assert torch.equal(process.add_noise(x0, t, eps), eps)


def test_respacing_keeps_alpha_bar_T_zero() -> None:
    process = zero_snr("cosine")
    respaced = process.respace([1, 250, 500, 1000])
    assert float(respaced.betas[-1]) == 1.0 and float(respaced.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(respaced.alphas_cumprod_64[1:], process.alphas_cumprod_64[[1, 250, 500, 1000]])


def test_zero_terminal_snr_needs_two_steps() -> None:
    with pytest.raises(ValueError, match="at least 2 steps"):
        DiscreteProcess(1, "cosine", zero_terminal_snr=True)


@pytest.mark.parametrize("part", [Eps(), LearnedVariance(Eps()), EDM()])
def test_parameterizations_undefined_at_T_are_refused(part: object) -> None:
    with pytest.raises(ConfigError, match="zero terminal SNR.*diffusion_pl.parameterization.V"):
        Denoiser(nn.Identity(), zero_snr("linear"), part)  # type: ignore[arg-type]
    Denoiser(nn.Identity(), DiscreteProcess(T, "linear"), part)  # type: ignore[arg-type]


@pytest.mark.parametrize("part", [V(), X0(), Velocity(), LearnedVariance(V())])
def test_parameterizations_defined_at_T_give_finite_predictions(part: object) -> None:
    process = zero_snr("linear")
    denoiser = Denoiser(nn.Identity(), process, part)  # type: ignore[arg-type]
    output = torch.randn(4, 3 * part.output_factor)  # type: ignore[attr-defined]
    x_t, t = torch.randn(4, 3), torch.full((4,), T)
    pred = part.prediction(output, x_t, t, process)  # type: ignore[attr-defined]
    assert bool(torch.isfinite(pred.x0).all()) and torch.equal(pred.eps, x_t)  # at T, x_t is the noise
    assert denoiser.parameterization is part


class ExactV(nn.Module):
    """A perfect v-prediction network for the Gaussian data N(MEAN, diag(STD^2)) at one time per batch (as samplers
    call it): v = alpha E[eps | x_t] - sigma E[x0 | x_t], E[x0 | x_t] = MEAN + alpha STD^2 / (alpha^2 STD^2 + sigma^2)
    (x_t - alpha MEAN) (Gaussian conjugacy); at alpha = 0, v = -MEAN."""

    def __init__(self, process: DiscreteProcess) -> None:
        super().__init__()
        self.process = process

    def forward(self, x_t: Tensor, net_time: Tensor) -> Tensor:
        t = net_time[:1]  # not respaced: the network time is the step
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        x0 = MEAN + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x_t - alpha * MEAN)
        return alpha * (x_t - alpha * x0) / sigma - sigma * x0


def exact_v(process: DiscreteProcess) -> Denoiser:
    return Denoiser(ExactV(process), process, V())


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_v_from_pure_noise_at_T_samples_its_exact_law(schedule: str, eta: float) -> None:
    """The 50-step DDIM chain started at T from pure noise with the v-network samples its law (moment recursion)."""
    process = zero_snr(schedule)
    gen = torch.Generator().manual_seed(0)
    x = sample_ddim(exact_v(process), process, process.prior_sample((N, 3), generator=gen), grid=strided_grid(T, 50),
                    eta=eta, generator=gen)
    assert bool(torch.isfinite(x).all())
    assert_matches_gaussian(x, *ddim_exact_law(process, 50, eta))


@pytest.mark.parametrize(("eta", "std_error"), [(0.0, 0.01), (1.0, 0.02)])
def test_the_chain_from_pure_noise_has_the_data_mean_exactly(eta: float, std_error: float) -> None:
    """With alpha-bar_T = 0, x_T ~ N(0, I) is q(x_T) itself, so every step of the chain with the exact denoiser maps
    the mean alpha_t MEAN to alpha_s MEAN: the data mean comes out exactly, for any grid, and the std is off only by
    the chain's own error (as on the original schedule). The original linear schedule's prior N(0, I) ignores
    alpha_T MEAN (alpha_T = 0.0064) and its chain keeps part of that bias."""
    for steps in (10, 50, T):
        mean, std = ddim_exact_law(zero_snr("linear"), steps, eta)
        assert float((mean - MEAN).abs().max()) < 1e-6
    assert float((std / STD - 1).abs().max()) < std_error
    original_mean, _ = ddim_exact_law(DiscreteProcess(T, "linear"), T, 0.0)
    assert float((original_mean - MEAN).abs().max()) > 5e-4


@pytest.mark.parametrize("sampler", [DDPM(100), DPMSolverPPSDE(100, Trailing())], ids=["ddpm", "dpmpp_sde"])
def test_stochastic_samplers_from_pure_noise_reach_the_data(sampler: object) -> None:
    """DDPM's respaced chain keeps beta_T = 1 (its first step draws x_{T'} afresh); DPM-Solver++(2M) SDE starts at T."""
    process, n = zero_snr("cosine"), 4000
    sampling = sampler.sampling_process(process)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(1)
    x = sampler.sample(exact_v(process).with_process(sampling), sampling,  # type: ignore[attr-defined]
                       sampling.prior_sample((n, 3), generator=gen), generator=gen)
    assert bool(torch.isfinite(x).all())
    assert float(((x.mean(0) - MEAN) / STD).abs().max()) < 5 / math.sqrt(n)
    assert float((x.std(0) / STD - 1).abs().max()) < 0.05


def test_trailing_grid_starts_at_T_and_euler_on_it_is_ddim() -> None:
    """Lin et al.'s trailing grid T, T - T/N, ... is DDIM's strided grid; Euler on it takes DDIM's steps, the first
    from pure noise (alpha_T = 0, where the EDM form x / alpha is undefined)."""
    process = zero_snr("linear")
    assert Trailing().times(process, 50).tolist() == strided_grid(T, 50).double().tolist()
    x_T = process.prior_sample((256, 3), generator=torch.Generator().manual_seed(2))
    euler = Euler(50, Trailing()).sample(exact_v(process), process, x_T)
    ddim = sample_ddim(exact_v(process), process, x_T, grid=strided_grid(T, 50))
    torch.testing.assert_close(euler, ddim, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", [Heun(50, Trailing()), DPMSolverPP(50, Trailing()),
                                     EDMStochastic(50, Trailing(), s_churn=10.0)], ids=["heun", "dpmpp", "edm"])
def test_fast_solvers_start_at_T_from_pure_noise_and_reach_the_data(sampler: object) -> None:
    """The EDM-form solvers take their first step from alpha_T = 0 (x / alpha undefined) as DDIM's, then their own."""
    process, n = zero_snr("cosine"), 4000
    gen = torch.Generator().manual_seed(3)
    x = sampler.sample(exact_v(process), process, process.prior_sample((n, 3), generator=gen),  # type: ignore
                       generator=gen)
    assert bool(torch.isfinite(x).all())
    assert float(((x.mean(0) - MEAN) / STD).abs().max()) < 5 / math.sqrt(n)
    assert float((x.std(0) / STD - 1).abs().max()) < 0.05


def test_log_snr_grid_is_refused_and_karras_starts_at_its_finite_sigma_max() -> None:
    process = zero_snr("cosine")
    with pytest.raises(ValueError, match="infinite on a zero-terminal-SNR process.*Trailing"):
        DPMSolverPP(10, LogSNR()).check(process)
    times = Karras().times(process, 10)
    assert bool(torch.isfinite(times).all()) and 0 < float(times[0]) < T
    sigma = process.sigma(times[:1]) / process.alpha(times[:1])
    assert float(sigma) == pytest.approx(80.0, rel=1e-4)
    with pytest.raises(ValueError, match="sigma_max must be finite"):
        Karras(sigma_max=math.inf)


def test_classifier_free_guidance_at_T_combines_the_x0_estimates() -> None:
    """At alpha = 0 both passes predict eps = x_t, whose x0 is 0 / 0; the guided x0 is (1 + w) x0_c - w x0_u, as
    elsewhere (where it equals the x0 of the guided eps)."""
    process = zero_snr("linear")
    x_t, w = torch.randn(8, 3), 2.0
    for step, atol in ((T, 0.0), (500, 1e-4)):
        t = torch.full((8,), step)
        cond = Prediction(x0=torch.randn(8, 3), eps=torch.zeros(8, 3))
        uncond = Prediction(x0=torch.randn(8, 3), eps=torch.zeros(8, 3))
        for pred in (cond, uncond):  # the eps consistent with each x0
            pred.eps = (x_t - process.alpha(t)[:, None] * pred.x0) / process.sigma(t)[:, None]
        guided = combine_guided(cond, uncond, w, x_t, t, process)
        torch.testing.assert_close(guided.x0, (1 + w) * cond.x0 - w * uncond.x0, rtol=atol, atol=atol)
        assert torch.equal(guided.eps, (1 + w) * cond.eps - w * uncond.eps)


def test_classifier_guidance_at_T_keeps_the_unguided_x0() -> None:
    """At alpha = 0 no eps determines x0; elsewhere the guided x0 is that of the guided eps (Ho et al. 2020, eq. 15)."""
    process = zero_snr("linear")
    unguided = exact_v(process)
    guided = classifier_guidance(unguided, lambda x, t: (x**2).sum(-1), process, 2.0)
    x_t = torch.randn(8, 3)
    for step in (T, 500):
        t = torch.full((8,), step)
        pred, plain = guided(x_t, t), unguided(x_t, t)
        assert bool(torch.isfinite(pred.x0).all()) and not torch.equal(pred.eps, plain.eps)
        expected = plain.x0 if step == T else (x_t - process.sigma(t)[:, None] * pred.eps) / process.alpha(t)[:, None]
        torch.testing.assert_close(pred.x0, expected)


def test_loss_weightings_are_finite_at_T() -> None:
    process, t = zero_snr("linear"), torch.tensor([1, 500, T])
    assert float(EDMWeighting(0.5).x0_weight(t, process)[-1]) == pytest.approx(1 / 0.25)
    assert float(MinSNR(5.0).x0_weight(t, process)[-1]) == 0.0
    assert float(V().x0_error_scale(t, process)[-1]) == 1.0


# ---------------------------------------------------------------------------------------------- command line

OVERLAY = ["overlays/zero_snr.yaml"]


def test_overlay_builds_a_v_model_on_a_zero_snr_process_that_samples_from_T(tmp_path: Path) -> None:
    model = run_cli(None, DDPM_FASHION, root=tmp_path, overlays=OVERLAY).model
    steps = model.process.num_steps
    assert float(model.process.alpha(torch.tensor([steps]))) == 0.0 and isinstance(model.denoiser.parameterization, V)
    assert isinstance(model.sampler, Euler) and model.sampler.grid(model.process)[0] == steps
    images = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())


def test_eps_on_a_zero_snr_process_is_one_error_screen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args(DDPM_FASHION, "--model.init_args.parameterization=diffusion_pl.parameterization.Eps",
                    root=tmp_path, overlays=OVERLAY)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: eps-prediction (Eps) is undefined")
    assert "diffusion_pl.parameterization.V" in err and "Traceback" not in err and len(err.splitlines()) <= 13
