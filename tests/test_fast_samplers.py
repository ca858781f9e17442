"""Few-step ODE solvers (Euler, Heun, DPM-Solver++(2M), UniPC) and the time grids they walk, against closed forms.

The exact probability-flow solution for Gaussian data. Write the process in EDM form (Karras et al. 2022, eq. 4):
x~ = x_t / alpha(t) = x0 + sigma~ eps with sigma~ = sigma(t) / alpha(t). The probability-flow ODE is
dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~ (eq. 3 with s = 1). For x0 ~ N(m, diag(v)) the denoiser is
D = m + v / (v + sigma~^2) (x~ - m) per coordinate, so x~ - D = sigma~^2 / (v + sigma~^2) (x~ - m) and
y = x~ - m obeys dy/dsigma~ = sigma~ / (v + sigma~^2) y = (d/dsigma~) log sqrt(v + sigma~^2) y. Hence
y(sigma~) = y(sigma~_0) sqrt((v + sigma~^2) / (v + sigma~_0^2)): every coordinate scales, and

    x(t) = alpha(t) (m + (x(t_0) / alpha(t_0) - m) sqrt((v + sigma~(t)^2) / (v + sigma~(t_0)^2))),

which at sigma~ = 0 is m + (x~_0 - m) sqrt(v / (v + sigma~_0^2)): the solution lands on the data's law.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from analytic import ConstantProcess, gaussian_denoiser
from jsonargparse import ArgumentParser
from torch import Tensor

from diffusion_pl.core.spec import build, spec_of
from diffusion_pl.parameterization import DenoiseFn, Prediction
from diffusion_pl.processes import (
    VESDE,
    VPSDE,
    DiscreteProcess,
    FlowProcess,
    ForwardProcess,
    SubVPSDE,
)
from diffusion_pl.processes.noise_levels import edm_sigma, sigma_range, times_at_sigmas
from diffusion_pl.samplers import (
    DDIM,
    DDPM,
    ODE,
    DPMSolverPP,
    DPMSolverPPSDE,
    EDMStochastic,
    Euler,
    EulerMaruyama,
    Heun,
    Karras,
    LogSNR,
    PredictorCorrector,
    Sampler,
    TimeGrid,
    Trailing,
    Uniform,
    UniPC,
    append_zero,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_unipc,
    sde_times,
    strided_grid,
)
from diffusion_pl.samplers.timegrids import EDM_SIGMA_MAX
from diffusion_pl.samplers.unipc import step_orders

MEAN = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64)
STD = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
SOLVERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m,
           **{f"unipc{p}": partial(sample_unipc, order=p) for p in (1, 2, 3)}}
#: The bounds of each solver's fitted slope of log error against log N (its order of accuracy, negated).
SLOPES = {"euler": (-1.2, -0.8), "heun": (-2.3, -1.7), "dpmpp_2m": (-2.3, -1.7), "unipc1": (-2.3, -1.7),
          "unipc2": (-3.3, -2.7), "unipc3": (-4.3, -3.4)}
GRIDS = (Karras(), Uniform(), Trailing(), LogSNR())


def processes() -> list[ForwardProcess]:
    return [DiscreteProcess(1000, "linear"), DiscreteProcess(1000, "cosine"), VPSDE(), SubVPSDE(), VESDE()]


PROCESS_IDS = ["ddpm-linear", "ddpm-cosine", "vp", "subvp", "ve"]


def start(process: ForwardProcess, t0: Tensor, batch: int = 64, seed: int = 0) -> Tensor:
    """x at time t0 drawn from the marginal of the Gaussian data, in float64."""
    noise = torch.randn(batch, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return process.alpha(t0) * (MEAN + noise * (STD**2 + edm_sigma(process, t0) ** 2).sqrt())


def exact_flow(process: ForwardProcess, x0: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
    """The probability-flow solution from x0 at t0 to t1 (module docstring); t1 = 0 is the data, sigma~ = 0."""
    s0 = edm_sigma(process, t0)
    s1 = torch.zeros_like(t1) if float(t1) == 0 else edm_sigma(process, t1)
    a0, a1 = process.alpha(t0), (torch.ones_like(t1) if float(t1) == 0 else process.alpha(t1))
    return a1 * (MEAN + (x0 / a0 - MEAN) * ((STD**2 + s1**2) / (STD**2 + s0**2)).sqrt())


def solve_error(solver: str, process: ForwardProcess, grid: Tensor) -> float:
    """Largest error of the solver on ``grid`` against the exact flow, from the data's marginal at grid[0]."""
    t0, t1 = grid[:1].double(), grid[-1:].double()
    x_T = start(process, t0)
    x = SOLVERS[solver](gaussian_denoiser(MEAN, STD, process), process, x_T, grid=grid.double())
    return (x - exact_flow(process, x_T, t0, t1)).abs().max().item()


def log_sigma_grid(process: ForwardProcess, steps: int) -> Tensor:
    """The explicit grid: log(sigma / alpha) uniform from log 10 to log 0.05, as process times."""
    sigmas = torch.exp(torch.linspace(math.log(10), math.log(0.05), steps + 1, dtype=torch.float64))
    return times_at_sigmas(process, sigmas)


def convergence_slope(solver: str, process: ForwardProcess) -> tuple[float, list[float]]:
    """The least-squares slope of log error against log N at N = 10, 20, 40, 80, and the errors."""
    steps = [10, 20, 40, 80]
    errors = [solve_error(solver, process, log_sigma_grid(process, n)) for n in steps]
    x = torch.tensor(steps, dtype=torch.float64).log()
    y = torch.tensor(errors, dtype=torch.float64).log()
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return slope, errors


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("process", [DiscreteProcess(1000, "cosine"), VPSDE(), VESDE(), FlowProcess()],
                         ids=["ddpm-cosine", "vp", "ve", "flow"])
def test_error_falls_with_the_solvers_order(solver: str, process: ForwardProcess) -> None:
    """On log(sigma~) uniform from log 10 to log 0.05 the error against the exact flow falls like N^-1 (Euler) and
    N^-2 (Heun, DPM-Solver++(2M)): fitted slopes -0.97, -2.06 and -1.92 on every process (the EDM form
    makes the numbers process-independent up to rounding). UniPC-p is of order p + 1, its corrector adding one to
    its predictor's (Zhao et al. 2023): fitted slopes -1.97, -2.94 and -3.68 for p = 1, 2, 3 (errors at N = 80:
    2.3e-3, 6.9e-5, 2.2e-6 on VP; DPM-Solver++(2M), which is UniP-2 alone, 7.3e-4); p = 3's slope between
    successive N steepens from -3.3 to -3.9 by N = 160-640."""
    slope, errors = convergence_slope(solver, process)
    assert all(finer < coarser for coarser, finer in zip(errors, errors[1:])), errors
    low, high = SLOPES[solver]
    assert low < slope < high, (slope, errors)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("process", processes(), ids=PROCESS_IDS)
def test_error_shrinks_with_the_steps_on_each_default_grid(solver: str, process: ForwardProcess) -> None:
    """From the prior's noise level to the data on every grid part, the error against the exact flow shrinks as
    N doubles (20, 40, 80). Below 20 steps it need not: on the cosine schedule (sigma~ up to 2e4 at T) Heun's
    trapezoid over a step from sigma~ = 2e4 to a few amplifies the second slope (error 1.5e3 at N = 5 on Uniform),
    and DPM-Solver++(2M)'s extrapolation across its uneven first steps is larger at N = 20 than at N = 10 on
    Karras and LogSNR (0.41 against 0.29, 0.08 against 0.05)."""
    for spacing in GRIDS:
        errors = [solve_error(solver, process, spacing.times(process, n)) for n in (20, 40, 80)]
        assert errors[0] > errors[1] > errors[2], (spacing, errors)


def limit_error(solver: str, process: ForwardProcess, grid: Tensor) -> float:
    """Largest error of the solver on ``grid`` (ending at the data) against what it tends to as N grows: the exact
    flow to the last noise level, then the exact denoiser there (its last step, x = D)."""
    t0, last = grid[:1].double(), grid[-2:-1].double()
    x_T = start(process, t0)
    den = gaussian_denoiser(MEAN, STD, process)
    x = SOLVERS[solver](den, process, x_T, grid=grid.double())
    return (x - den(exact_flow(process, x_T, t0, last), last).x0).abs().max().item()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("process", [*processes(), FlowProcess()], ids=[*PROCESS_IDS, "flow"])
def test_unipc_converges_on_each_default_grid(order: int, process: ForwardProcess) -> None:
    """From the prior's noise level to the data on every grid part, UniPC's error shrinks as N doubles (20, 40, 80)
    against its limit (:func:`limit_error`). Against the exact flow to sigma~ = 0 it would stop at the last step's
    own error, D instead of the flow over [0, sigma_min] (8e-4 on VE and the linear DDPM), which UniPC-3 reaches at
    N = 20-40 (3.4e-4, then 7.9e-4 on VE's Uniform grid). At N = 80 on Karras, UniPC-2's error against the exact
    flow is 5-8x below DPM-Solver++(2M)'s (5e-4 to 1.4e-3 against 3.8e-3 to 7.4e-3); Uniform and Trailing grids on
    VP-like processes converge slowly (UniPC-2 on VP Uniform: 0.75, 0.32, 0.14), their last steps spanning most of
    the log-SNR range."""
    solver = f"unipc{order}"
    for spacing in GRIDS:
        errors = [limit_error(solver, process, spacing.times(process, n)) for n in (20, 40, 80)]
        assert errors[0] > errors[1] > errors[2], (spacing, errors)


def test_unipc_lowers_its_order_at_the_start_and_before_the_data() -> None:
    """UniP-p_i: min(p, i + 1) (a multistep start), and on a grid ending at the data at most N - i, so the step to
    sigma~ = 0 is x = D; a grid stopping above the data keeps the full order to its end."""
    process = VPSDE()
    assert step_orders(Karras().times(process, 6), 3) == [1, 2, 3, 3, 2, 1]
    assert step_orders(Karras().times(process, 6), 2) == [1, 2, 2, 2, 2, 1]
    assert step_orders(Karras().times(process, 2), 3) == [1, 1]
    assert step_orders(log_sigma_grid(process, 5), 3) == [1, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="strictly decreasing"):
        step_orders(torch.tensor([0.5, 0.7, 0.0]), 2)


def test_unipc_projects_each_prediction_and_evaluates_there() -> None:
    """``project`` maps every step's prediction (N calls, at the grid's times), the denoiser is then evaluated at the
    projected sample (diffusers' order: UniC corrects with the estimate there), and the sample keeps the projection."""
    process = DiscreteProcess(1000, "cosine")
    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    grid = Karras().times(process, 8)
    x_T = process.prior_sample((16, 3), generator=torch.Generator().manual_seed(2))
    projected: list[float] = []
    inputs: list[Tensor] = []

    def set_first(x: Tensor, t: Tensor) -> Tensor:
        projected.append(float(t[0]))
        return torch.cat([torch.full_like(x[:, :1], 0.25), x[:, 1:]], dim=1)

    def evaluated(x_t: Tensor, t: Tensor) -> Prediction:
        inputs.append(x_t)
        return den(x_t, t)

    for order in (2, 3):
        projected.clear()
        inputs.clear()
        out = sample_unipc(evaluated, process, x_T, grid=grid, order=order, project=set_first)
        assert projected == [float(t) for t in grid[1:].float()]
        assert len(inputs) == 8 and all(bool((x[:, 0] == 0.25).all()) for x in inputs[1:])
        assert bool((out[:, 0] == 0.25).all())


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_reports_each_step_to_the_observer(order: int) -> None:
    """``on_step(i, t, x, x0_hat)`` once per step: t the (B,) time reached, x (B, 3) the prediction there (after the
    projection), x0_hat (B, 3) the estimate at the step's start, i.e. at the x reported one step before (x_T for
    the first); the last x is the sample, the same as without the observer."""
    process = VPSDE()
    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    sampler = UniPC(6, order=order)
    grid = sampler.grid(process)
    x_T = process.prior_sample((5, 3), generator=torch.Generator().manual_seed(4))
    steps: list[tuple[int, Tensor, Tensor, Tensor]] = []
    out = sampler.sample(den, process, x_T, on_step=lambda i, t, x, x0: steps.append((i, t, x.clone(), x0.clone())))
    assert torch.equal(out, sampler.sample(den, process, x_T))
    assert [i for i, *_ in steps] == list(range(6))
    for i, t, x, x0 in steps:
        assert t.shape == (5,) and x.shape == x0.shape == (5, 3)
        assert bool((t == grid[i + 1].float()).all())
        start_x = x_T if i == 0 else steps[i - 1][2]
        torch.testing.assert_close(x0, den(start_x, torch.full((5,), float(grid[i]))).x0)
    assert torch.equal(steps[-1][2], out)


def test_unipc_matches_diffusers() -> None:
    """Bit-for-bit up to float32 against diffusers' UniPCMultistepScheduler (bh2, data prediction, lower-order final
    steps) on the same trailing steps of the same DDPM schedule with the exact eps, at orders 1-3."""
    diffusers = pytest.importorskip("diffusers")
    process = DiscreteProcess(1000, "linear")
    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    x_T = process.prior_sample((8, 3), generator=torch.Generator().manual_seed(3))
    for order in (1, 2, 3):
        scheduler = diffusers.UniPCMultistepScheduler(trained_betas=process.betas[1:].tolist(), solver_order=order,
                                                      solver_type="bh2", predict_x0=True, lower_order_final=True,
                                                      timestep_spacing="trailing", final_sigmas_type="zero")
        scheduler.set_timesteps(10)
        grid = append_zero(scheduler.timesteps.double() + 1)  # diffusers' step k is this process's k + 1
        assert torch.equal(grid, Trailing().times(process, 10))
        x = x_T
        for step in scheduler.timesteps:
            eps = den(x, torch.full((8,), int(step) + 1)).eps
            x = scheduler.step(eps, step, x).prev_sample
        torch.testing.assert_close(sample_unipc(den, process, x_T, grid=grid, order=order), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("process", processes(), ids=PROCESS_IDS)
def test_karras_grid_spans_the_process_sigma_range(process: ForwardProcess) -> None:
    """Eq. 5 between the process's own sigma~ at its largest (at most EDM's 80) and smallest training times,
    decreasing in t, then 0; explicit sigma_min/sigma_max are hit at the grid's ends and the levels follow eq. 5."""
    low, high = sigma_range(process)
    high = min(high, EDM_SIGMA_MAX)
    times = Karras().times(process, 18)
    assert times.dtype == torch.float64 and len(times) == 19 and times[-1].item() == 0.0
    assert bool((times[1:] < times[:-1]).all())
    levels = edm_sigma(process, times[:-1])
    torch.testing.assert_close(levels[[0, -1]], torch.tensor([high, low], dtype=torch.float64), rtol=1e-9, atol=0)
    ramp = torch.linspace(0, 1, 18, dtype=torch.float64)
    for rho, sigma_min, sigma_max in ((7.0, None, None), (3.0, 0.05, 5.0)):
        grid = Karras(rho, sigma_min, sigma_max)
        lo, hi = sigma_min or low, sigma_max or high
        eq5 = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        torch.testing.assert_close(edm_sigma(process, grid.times(process, 18)[:-1]), eq5, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="outside the process's range"):
        Karras(sigma_max=sigma_range(process)[1] * 2).times(process, 5)
    with pytest.raises(ValueError, match="outside the process's range"):
        Karras(sigma_min=low / 2).times(process, 5)


@pytest.mark.parametrize("process", processes(), ids=PROCESS_IDS)
def test_every_grid_is_decreasing_from_the_largest_time_to_zero(process: ForwardProcess) -> None:
    """Each grid part gives N strictly decreasing times from t_max (T, or 1 for an SDE; Karras: sigma~ = 80 where the
    process reaches higher), then 0."""
    t_max = process.num_steps if isinstance(process, DiscreteProcess) else process.t_max
    for spacing in GRIDS:
        for steps in (1, 2, 7, 50):
            times = spacing.times(process, steps)
            capped = isinstance(spacing, Karras) and sigma_range(process)[1] > EDM_SIGMA_MAX  # starts at sigma~ 80
            first = edm_sigma(process, times[:1]).item() if capped else times[0].item()
            assert len(times) == steps + 1 and first == pytest.approx(EDM_SIGMA_MAX if capped else t_max, rel=1e-9)
            assert times[-1].item() == 0.0, spacing
            assert bool((times[1:] < times[:-1]).all()), (spacing, times)


def test_trailing_starts_at_T() -> None:
    """Lin et al. 2024, Table 2: T (1 - i / N); on a discrete process the integer steps of DDIM's strided grid."""
    discrete = DiscreteProcess(1000)
    assert Trailing().times(discrete, 10).tolist() == [1000.0, *range(900, 0, -100), 0.0]
    assert torch.equal(Trailing().times(discrete, 7).long(), strided_grid(1000, 7))
    assert Trailing().times(VPSDE(), 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="at most the process's T=1000 steps"):
        Trailing().times(discrete, 1001)
    assert len(Karras().times(DiscreteProcess(10, "cosine"), 30)) == 31  # non-integer times allow more steps than T


def test_uniform_and_log_snr_grids() -> None:
    """Uniform: equal steps in t over [t_min, t_max]; LogSNR: equal steps in lambda (sde_times' log_snr levels)."""
    vp = VPSDE()
    torch.testing.assert_close(Uniform().times(vp, 5), append_zero(torch.linspace(1.0, vp.t_min, 5,
                                                                                  dtype=torch.float64)))
    torch.testing.assert_close(LogSNR().times(vp, 5), append_zero(sde_times(vp, 4, "log_snr")), rtol=1e-9, atol=1e-12)
    discrete = DiscreteProcess(1000, "cosine")
    lam = discrete.log_snr(LogSNR().times(discrete, 9)[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((8,), float(lam[-1] - lam[0]) / 8, dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_discrete_interpolation_is_exact_at_steps_and_monotone_between(schedule: str) -> None:
    """A float time equal to an integer step gives the table's values: bit for bit in float32 (so a sampler on an
    integer grid in float gives the same numbers), alpha-bar's bit for bit in float64 (alpha and sigma are then its
    float64 square roots); between steps lambda is linear (sigma~ linear on (0, 1)), alpha-bar strictly
    decreasing, the net time interpolated; :func:`times_at_sigmas` inverts it back to the integer steps."""
    process = DiscreteProcess(1000, schedule)
    steps = torch.arange(0, 1001)
    for name in ("alpha", "sigma", "alpha_bar", "net_input_time"):
        assert torch.equal(getattr(process, name)(steps.float()), getattr(process, name)(steps)), name
    for name in ("alpha_bar", "net_input_time"):
        assert torch.equal(getattr(process, name)(steps.double()), getattr(process, name)(steps).double()), name
    for name in ("alpha", "sigma"):
        torch.testing.assert_close(getattr(process, name)(steps.double()), getattr(process, name)(steps).double())
    fine = torch.linspace(0, 1000, 10 * 1000 + 1, dtype=torch.float64)
    alpha_bar = process.alpha_bar(fine)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    torch.testing.assert_close(process.alpha(fine) ** 2 + process.sigma(fine) ** 2, torch.ones_like(fine))
    lam = process.log_snr(steps.double())
    middle = process.log_snr(steps[1:-1].double() + 0.25)
    torch.testing.assert_close(middle, 0.75 * lam[1:-1] + 0.25 * lam[2:], rtol=1e-12, atol=0)
    torch.testing.assert_close(edm_sigma(process, torch.tensor([0.25, 0.5], dtype=torch.float64)),
                               edm_sigma(process, torch.tensor([1.0], dtype=torch.float64)) * torch.tensor(
                                   [0.25, 0.5], dtype=torch.float64))
    torch.testing.assert_close(process.net_input_time(torch.tensor([2.5])), torch.tensor([2.5]))
    respaced = process.respace([100, 200, 300])
    torch.testing.assert_close(respaced.net_input_time(torch.tensor([1.5, 2.25])), torch.tensor([150.0, 225.0]))
    some = torch.tensor([1000, 731, 400, 17, 2, 1])
    back = times_at_sigmas(process, edm_sigma(process, some.double()))
    torch.testing.assert_close(back, some.double(), rtol=0, atol=1e-6)


def test_euler_is_deterministic_ddim() -> None:
    """Euler in sigma~ is DDIM with eta = 0 (Karras et al. 2022, Sec. 3): same grid, same numbers to rounding, on
    a discrete integer grid and on the VP SDE."""
    for process, grid in ((DiscreteProcess(1000, "cosine"), strided_grid(1000, 20)),
                          (VPSDE(), append_zero(sde_times(VPSDE(), 20, "log_snr")))):
        den = gaussian_denoiser(MEAN.float(), STD.float(), process)
        x_T = process.prior_sample((64, 3), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(sample_euler(den, process, x_T, grid=grid),
                                   sample_ddim(den, process, x_T, grid=grid), rtol=1e-4, atol=1e-4)


def counting(den: DenoiseFn, calls: list[Tensor]) -> DenoiseFn:
    """``den`` that records the times it is called at."""

    def counted(x_t: Tensor, t: Tensor) -> Prediction:
        calls.append(t)
        return den(x_t, t)

    return counted


@pytest.mark.parametrize(("sampler", "evaluations"), [(Euler(10), 10), (Heun(10), 19), (DPMSolverPP(10), 10),
                                                     (UniPC(10), 10), (UniPC(10, order=3), 10)])
def test_parts_sample_like_their_function_with_a_projection_and_an_observer(sampler: Sampler,
                                                                            evaluations: int) -> None:
    """The part calls its function on its default grid (Karras) bit for bit; the solvers only call the DenoiseFn
    (so guidance composes), N or 2N - 1 times, never at t = 0; ``project`` reaches every step and ``on_step`` sees
    each step without changing the result."""
    process = DiscreteProcess(1000, "cosine")
    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    x_T = process.prior_sample((16, 3), generator=torch.Generator().manual_seed(2))
    function = {Euler: sample_euler, Heun: sample_heun, DPMSolverPP: sample_dpmpp_2m,
                UniPC: partial(sample_unipc, order=getattr(sampler, "order", 2))}[type(sampler)]
    grid = Karras().times(process, 10)
    assert torch.equal(sampler.grid(process), grid)
    calls: list[Tensor] = []
    out = sampler.sample(counting(den, calls), process, x_T)
    assert torch.equal(out, function(den, process, x_T, grid=grid))
    assert len(calls) == evaluations and all(bool((t > 0).all()) for t in calls)
    seen: list[tuple[int, float]] = []
    set_first = lambda x, t: torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], dim=1)  # noqa: E731
    observed = sampler.sample(den, process, x_T, project=set_first,
                              on_step=lambda i, t, x, x0: seen.append((i, float(t[0]))))
    assert torch.equal(observed, function(den, process, x_T, grid=grid, project=set_first))
    assert bool((observed[:, 0] == 0).all())
    assert seen == [(i, float(grid[i + 1].float())) for i in range(10)]


def test_deterministic_samples_depend_only_on_the_seed() -> None:
    """The same seed gives the same image, whatever generator is passed and whichever batch it is drawn in."""
    process = VPSDE()
    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    for sampler in (Euler(8), Heun(8), DPMSolverPP(8, spacing=LogSNR()), UniPC(8, order=3)):
        x_T = process.prior_sample((8, 3), generator=torch.Generator().manual_seed(3))
        first = sampler.sample(den, process, x_T, generator=torch.Generator().manual_seed(0))
        again = sampler.sample(den, process, x_T.clone(), generator=torch.Generator().manual_seed(99))
        alone = sampler.sample(den, process, x_T[5:6])
        assert torch.equal(first, again)
        torch.testing.assert_close(alone, first[5:6], rtol=1e-6, atol=1e-6)


def test_check_and_arguments() -> None:
    for sampler in (Euler(), Heun(), DPMSolverPP(), UniPC()):
        for process in [*processes(), FlowProcess()]:
            sampler.check(process)
        with pytest.raises(ValueError, match=f"{type(sampler).__name__} builds its grid on a DiscreteProcess or an "
                                             "SDEProcess, got ConstantProcess"):
            sampler.check(ConstantProcess())
    with pytest.raises(ValueError, match="at most the process's T=100 steps"):
        Heun(200, spacing=Trailing()).check(DiscreteProcess(100))
    with pytest.raises(ValueError, match="at least 1"):
        Heun(0)
    with pytest.raises(ValueError, match="spacing must be a TimeGrid"):
        Heun(10, spacing="karras")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UniPC order must be one of 1, 2, 3, got 4"):
        UniPC(order=4)
    with pytest.raises(ValueError, match="UniPC order must be one of"):
        sample_unipc(lambda x, t: Prediction(x, x), VPSDE(), torch.zeros(1, 3), grid=torch.tensor([1.0, 0.0]), order=0)
    with pytest.raises(ValueError, match="rho must be positive"):
        Karras(rho=0)
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        Karras(sigma_min=1.0, sigma_max=0.5)


def test_parts_build_from_specs_and_yaml() -> None:
    """spec_of/build round trips (the checkpoint route) and jsonargparse's class_path route (LightningCLI's), with
    the grid a nested part; the config with the default grid dumps."""
    for sampler in (Heun(18), Euler(10, spacing=Trailing()), DPMSolverPP(20, spacing=Karras(5.0, 0.01, 10.0)),
                    UniPC(12, LogSNR(), order=3)):
        rebuilt = build(spec_of(sampler))
        assert type(rebuilt) is type(sampler) and repr(rebuilt) == repr(sampler)
        assert rebuilt.spacing == sampler.spacing
    assert spec_of(DPMSolverPP(20, spacing=Karras(rho=5.0))) == {
        "class_path": "diffusion_pl.samplers.configs.DPMSolverPP",
        "init_args": {"steps": 20, "spacing": {"class_path": "diffusion_pl.samplers.timegrids.Karras",
                                               "init_args": {"rho": 5.0, "sigma_min": None, "sigma_max": None}}}}
    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    config = parser.parse_args(["--sampler=DPMSolverPP", "--sampler.steps=20"])
    sampler = parser.instantiate_classes(config).sampler
    assert isinstance(sampler, DPMSolverPP) and sampler.steps == 20 and sampler.spacing is None
    assert "DPMSolverPP" in parser.dump(config)
    config = parser.parse_args(["--sampler=Heun", "--sampler.spacing=Karras", "--sampler.spacing.rho=3"])
    sampler = parser.instantiate_classes(config).sampler
    assert isinstance(sampler, Heun) and sampler.spacing == Karras(rho=3.0)
    config = parser.parse_string("sampler:\n  class_path: diffusion_pl.samplers.Euler\n  init_args:\n    steps: 5\n"
                                 "    spacing:\n      class_path: diffusion_pl.samplers.Trailing\n")
    sampler = parser.instantiate_classes(config).sampler
    assert isinstance(sampler, Euler) and isinstance(sampler.spacing, TimeGrid) and sampler.spacing == Trailing()
    config = parser.parse_string("sampler: {class_path: diffusion_pl.samplers.UniPC, init_args: {steps: 10, order: 3}}")
    sampler = parser.instantiate_classes(config).sampler
    assert isinstance(sampler, UniPC) and (sampler.steps, sampler.order, sampler.spacing) == (10, 3, None)
    assert spec_of(sampler) == {"class_path": "diffusion_pl.samplers.configs.UniPC",
                                "init_args": {"steps": 10, "spacing": None, "order": 3}}


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPMSolverPP", "UniPC"])
def test_model_samples_with_the_part_from_the_command_line(name: str, tmp_path) -> None:  # noqa: ANN001
    """``--model.init_args.sampler=DPMSolverPP --model.init_args.sampler.steps=3`` (and a grid override) on the tiny
    DDPM model: the UNet sees non-integer steps; an image depends only on its seed, not on its batch."""
    from helpers import DDPM_FASHION, run_cli

    cli = run_cli(None, DDPM_FASHION, f"--model.init_args.sampler={name}", "--model.init_args.sampler.steps=3",
                  "--model.init_args.sampler.spacing=Karras", "--model.init_args.sampler.spacing.rho=5", root=tmp_path)
    model = cli.model.eval()
    assert type(model.sampler).__name__ == name and model.sampler.steps == 3
    assert model.sampler.spacing == Karras(rho=5.0)
    times: list[Tensor] = []
    forward = model.denoiser.net.forward
    model.denoiser.net.forward = lambda x, t, **cond: (times.append(t), forward(x, t, **cond))[1]
    noise = model.process.prior_sample((3, *model.latent_shape), generator=torch.Generator().manual_seed(7))
    images = model.sample(noise=noise)
    assert images.shape == (3, *model.latent_shape) and bool(images.isfinite().all())
    first = min(model.process.num_steps, times_at_sigmas(model.process, torch.tensor([EDM_SIGMA_MAX])).item())
    assert times[0][0].item() == pytest.approx(first, rel=1e-6) and any(t[0] != t[0].round() for t in times)
    torch.testing.assert_close(model.sample(noise=noise[1:2]), images[1:2], rtol=1e-5, atol=1e-5)
    assert torch.equal(model.sample(noise=noise), images)


def test_stochastic_samplers_reduce_to_the_deterministic_ones() -> None:
    """EDM's Alg. 2 with S_churn = 0 is Alg. 1 (Heun) bit for bit; DPM-Solver++(2M) SDE with eta = 0 is
    DPM-Solver++(2M) to rounding (the same update, written as k-diffusion's midpoint form)."""
    from diffusion_pl.samplers import sample_dpmpp_2m_sde, sample_edm_stochastic

    for process in processes():
        den = gaussian_denoiser(MEAN.float(), STD.float(), process)
        grid = Karras().times(process, 10)
        x_T = process.prior_sample((8, 3), generator=torch.Generator().manual_seed(4))
        assert torch.equal(sample_edm_stochastic(den, process, x_T, grid=grid),
                           sample_heun(den, process, x_T, grid=grid))
        torch.testing.assert_close(sample_dpmpp_2m_sde(den, process, x_T, grid=grid, eta=0.0),
                                   sample_dpmpp_2m(den, process, x_T, grid=grid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("process", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_stochastic_samplers_reach_the_data_law(process: ForwardProcess) -> None:
    """With the exact denoiser, 20000 samples of EDMStochastic (EDM's ImageNet-64 churn, 40 in [0.05, 50], with
    S_noise 1 as the denoiser is exact) and DPMSolverPPSDE (eta = 1): the mean within 5 standard errors of the
    data's, the std's relative error shrinking with N = 10, 30, 90 to below 5% (measured: EDM 0.68, 0.07-0.09,
    0.02-0.04 on VP; DPM++ SDE 0.21, 0.10, 0.01; the std's own standard error is 0.5%)."""
    from diffusion_pl.samplers import DPMSolverPPSDE, EDMStochastic

    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    for make in (lambda n: EDMStochastic(n, s_churn=40.0, s_tmin=0.05, s_tmax=50.0),
                 lambda n: DPMSolverPPSDE(n)):
        errors = []
        for steps in (10, 30, 90):
            gen = torch.Generator().manual_seed(5)
            x = make(steps).sample(den, process, process.prior_sample((20_000, 3), generator=gen), generator=gen)
            standard_error = STD.float() / math.sqrt(len(x))
            errors.append((x.std(0) / STD.float() - 1).abs().max().item())
        assert bool(((x.mean(0) - MEAN.float()).abs() < 5 * standard_error).all()), make(1)
        assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, (make(1), errors)
        again = make(10).sample(den, process, process.prior_sample((4, 3), generator=torch.Generator().manual_seed(6)),
                                generator=torch.Generator().manual_seed(6))
        assert torch.equal(again, make(10).sample(den, process, process.prior_sample(
            (4, 3), generator=torch.Generator().manual_seed(6)), generator=torch.Generator().manual_seed(6)))


def test_stochastic_parts_validate_and_build_from_specs() -> None:
    from diffusion_pl.samplers import DPMSolverPPSDE, EDMStochastic

    for sampler in (EDMStochastic(18, Karras(), 40.0, 0.05, 50.0, 1.003), DPMSolverPPSDE(20, LogSNR(), 0.5)):
        assert repr(build(spec_of(sampler))) == repr(sampler)
        sampler.check(DiscreteProcess(1000, "cosine"))
    for make, message in ((lambda: EDMStochastic(s_churn=-1.0), "S_churn must be >= 0"),
                          (lambda: EDMStochastic(s_tmin=1.0, s_tmax=0.5), "S_tmin < S_tmax"),
                          (lambda: EDMStochastic(s_noise=0.0), "S_noise must be positive"),
                          (lambda: DPMSolverPPSDE(eta=1.5), "eta must be in")):
        with pytest.raises(ValueError, match=message):
            make()
    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    sampler = parser.instantiate_classes(parser.parse_args(["--sampler=EDMStochastic", "--sampler.s_churn=40"])).sampler
    assert isinstance(sampler, EDMStochastic) and sampler.s_churn == 40.0 and sampler.s_tmax is None


@pytest.mark.parametrize("sampler", [Heun(10), DPMSolverPP(20)], ids=["heun", "dpmpp_2m"])
def test_pipelines_inpaint_and_start_below_T_with_a_fast_sampler(sampler: Sampler) -> None:
    """Inpainting by replacement reaches the solvers as ``project`` (at non-integer steps of a discrete process) and
    keeps the known coordinate; interpolation from t = 0.02 T cuts the Karras grid (SDEdit) and gives the images
    back up to noise of sigma(0.02 T)."""
    from test_pipelines import COV, X1, ExactModel, correlated_denoiser

    from diffusion_pl.pipelines import inpaint, interpolate

    process = DiscreteProcess(100, "linear")
    model = ExactModel(process, sampler, lambda p: correlated_denoiser(torch.zeros(2, dtype=torch.float64), COV, p))
    images = torch.tensor([X1, 0.0]).expand(500, 1, 1, 2).clone()
    out = inpaint(model, images, torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2), method="replace",
                  generator=torch.Generator().manual_seed(0))
    assert bool((out[..., 0] == X1).all()) and bool(out.isfinite().all())
    assert 0.3 < float(out[..., 1].mean()) < 0.9  # replacement's known bias towards 0 (x2 | x1 has mean 0.9)
    cosine = DiscreteProcess(1000, "cosine")
    model = ExactModel(cosine, sampler, lambda p: gaussian_denoiser(torch.zeros(1, 4, 4), torch.ones(1, 4, 4), p))
    x, x_prime = torch.rand(1, 4, 4) * 2 - 1, torch.rand(1, 4, 4) * 2 - 1
    ends = interpolate(model, x, x_prime, torch.tensor([0.0, 1.0]), t=0.02, generator=torch.Generator().manual_seed(1))
    assert float((ends[0] - x).abs().mean()) < 0.06 and float((ends[1] - x_prime).abs().mean()) < 0.06


OBSERVED_SAMPLERS = {
    "DDPM": (DDPM(), "discrete"), "DDIM": (DDIM(20), "discrete"), "DDIM eta=1": (DDIM(20, eta=1.0), "discrete"),
    "Euler": (Euler(8), "discrete"), "Heun": (Heun(8), "vp"), "DPMSolverPP": (DPMSolverPP(8), "vp"),
    "EDMStochastic": (EDMStochastic(8, s_churn=10.0), "vp"), "DPMSolverPPSDE": (DPMSolverPPSDE(8), "discrete"),
    "EulerMaruyama": (EulerMaruyama(20), "vp"), "PredictorCorrector": (PredictorCorrector(10), "vp"),
    "ODE heun": (ODE("heun", steps=10), "vp"), "UniPC": (UniPC(8), "vp"),
    "UniPC order=3": (UniPC(8, order=3), "discrete"),
}


@pytest.mark.parametrize("name", OBSERVED_SAMPLERS)
def test_every_sampler_reports_each_step_without_changing_the_sample(name: str) -> None:
    """``on_step(i, t, x, x0_hat)`` is called once per step in order with decreasing times (PC reports its predictor
    and corrector moves, two per time); the last x it sees is the sample; x0_hat is the denoiser's estimate at the
    step's start (the exact one at x_T, except where EDM's churn first raises the noise); and with the same generator
    the sample is bit-identical without the observer."""
    sampler, kind = OBSERVED_SAMPLERS[name]
    process = DiscreteProcess(100, "cosine") if kind == "discrete" else VPSDE()
    process = sampler.sampling_process(process)
    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    x_T = process.prior_sample((6, 3), generator=torch.Generator().manual_seed(4))
    steps: list[tuple[int, float, Tensor, Tensor]] = []
    observed = sampler.sample(den, process, x_T, generator=torch.Generator().manual_seed(5),
                              on_step=lambda i, t, x, x0: steps.append((i, float(t[0]), x.clone(), x0.clone())))
    plain = sampler.sample(den, process, x_T, generator=torch.Generator().manual_seed(5))
    assert torch.equal(observed, plain)
    assert [i for i, *_ in steps] == list(range(len(steps))) and len(steps) >= 8
    times = [t for _, t, *_ in steps]
    per_time = 2 if isinstance(sampler, PredictorCorrector) else 1
    assert all(a >= b for a, b in zip(times, times[1:])) and times[0] > times[-1], times
    assert max(times.count(t) for t in times) == per_time, times
    assert torch.equal(steps[-1][2], plain)
    if not isinstance(sampler, EDMStochastic):
        expected = den(x_T, torch.full((6,), float(sampler.grid(process)[0]))).x0
        torch.testing.assert_close(steps[0][3], expected)
    assert not torch.equal(steps[0][3], steps[-1][3])


def test_an_adaptive_ode_refuses_an_observer() -> None:
    """rk45 chooses its own steps and takes no per-step hook: the error names the fixed-step methods."""
    process = VPSDE()
    den = gaussian_denoiser(MEAN.float(), STD.float(), process)
    with pytest.raises(ValueError, match="method='heun'"):
        ODE("rk45").sample(den, process, process.prior_sample((2, 3)), on_step=lambda *step: None)
