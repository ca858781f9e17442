"""Typed sampler configurations: each checks the process it is given, builds its default time grid and calls its
sampling function, e.g. in YAML ``sampler: {class_path: diffusion_pl.samplers.DDIM, init_args: {steps: 50}}``.

These classes are the only place that dispatches on the type of the forward process. A caller samples with

    process = sampler.sampling_process(process)      # DDPM(steps=S) respaces; the others keep the process
    x = sampler.sample(denoise, process, x_T, generator=generator)   # denoise bound to that process
"""

from __future__ import annotations

import abc
from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.spec import Configurable
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.discrete import DiscreteProcess, FixedVariance
from diffusion_pl.processes.noise_levels import time_range
from diffusion_pl.processes.ode import ODEMethod, check_ode_method
from diffusion_pl.processes.sde import SDEProcess
from diffusion_pl.samplers.ddim import check_eta, sample_ddim
from diffusion_pl.samplers.ddpm import sample_ddpm
from diffusion_pl.samplers.edm import sample_dpmpp_2m, sample_euler, sample_heun
from diffusion_pl.samplers.edm_sde import (
    check_churn,
    sample_dpmpp_2m_sde,
    sample_edm_stochastic,
)
from diffusion_pl.samplers.grids import (
    TimeSpacing,
    append_zero,
    check_spacing,
    check_steps,
    ddpm_grid,
    sde_times,
    strided_grid,
    strided_steps,
)
from diffusion_pl.samplers.observe import OnStepFn, observed
from diffusion_pl.samplers.ode import sample_ode
from diffusion_pl.samplers.sde import (
    Predictor,
    StepSizeNorm,
    check_pc_options,
    sample_euler_maruyama,
    sample_pc,
)
from diffusion_pl.samplers.timegrids import Karras, TimeGrid
from diffusion_pl.samplers.unipc import check_unipc_order, sample_unipc

HParam = int | float | str | bool


class Sampler(Configurable, abc.ABC):
    """A sampler's options; :meth:`sample` runs it on a denoiser and a forward process.

    Subclasses store exactly their ``__init__`` arguments as public attributes of the same names (:meth:`options`
    lists them) and implement :meth:`check`, :meth:`_grid` and :meth:`_run`.
    """

    @abc.abstractmethod
    def check(self, process: ForwardProcess) -> None:
        """Raise ValueError, saying what to use instead, if this sampler cannot run on ``process``."""

    def sampling_process(self, process: ForwardProcess) -> ForwardProcess:
        """The process to sample (and to bind the denoiser to): ``process`` itself unless the sampler respaces it."""
        self.check(process)
        return process

    def grid(self, process: ForwardProcess) -> Tensor:
        """The default decreasing time grid on the (sampling) process: long steps, or float64 times for an SDE."""
        self.check(process)
        return self._grid(process)

    def sample(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor | None = None,
               generator: torch.Generator | None = None, progress: bool = False,
               project: ProjectFn | None = None, on_step: OnStepFn | None = None) -> Tensor:
        """Run the sampler from ``x_T`` down ``grid`` (default :meth:`grid`) on the sampling process.

        Args:
            denoise: (x_t, t) -> Prediction under ``process``.
            process: The process from :meth:`sampling_process`.
            x_T: Sample at the grid's first time (prior noise for the default grid).
            grid: Decreasing times to visit instead of the default, e.g. one starting below T (SDEdit).
            generator: Random generator on x_T's device.
            progress: Show a progress bar.
            project: Optional (x, t) -> x applied after every step (inpainting by replacement).
            on_step: Optional observer (i, t, x, x0_hat) of every step (:data:`~diffusion_pl.samplers.observe.OnStepFn`);
                the sample is the same with or without it.

        Returns:
            The sample.
        """
        self.check(process)
        if on_step is not None:
            denoise, project = observed(denoise, project, on_step)
        return self._run(denoise, process, x_T, self._grid(process) if grid is None else grid, generator, progress,
                         project)

    def options(self) -> dict[str, HParam | None]:
        """The sampler's arguments by name: its public attributes."""
        return {name: value for name, value in vars(self).items() if not name.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    @abc.abstractmethod
    def _grid(self, process: ForwardProcess) -> Tensor:
        """The default grid on a process that passed :meth:`check`."""

    @abc.abstractmethod
    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        """Call the sampling function."""


class DDPM(Sampler):
    """Ancestral sampling (Ho et al. 2020, Alg. 2; :func:`~diffusion_pl.samplers.ddpm.sample_ddpm`).

    Args:
        steps: Sample a respaced chain of this many steps (Nichol & Dhariwal 2021, Sec. 4) on the strided
            sub-sequence of :func:`~diffusion_pl.samplers.grids.strided_steps`; None for all T steps.
        variance: Fixed reverse variance, beta_t or beta-tilde_t (a learned variance takes precedence).
    """

    def __init__(self, steps: int | None = None, variance: Literal["beta", "posterior"] = "beta") -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"DDPM steps must be a positive number of steps or None (all of them), got {steps}")
        if variance not in ("beta", "posterior"):
            raise ValueError(f"unknown DDPM variance {variance!r}; choose 'beta' or 'posterior'")
        self.steps = steps
        self.variance: FixedVariance = variance

    def check(self, process: ForwardProcess) -> None:
        """DDPM walks the integer steps of a :class:`DiscreteProcess`, at most T of them."""
        if not isinstance(process, DiscreteProcess):
            raise ValueError(f"DDPM samples a DiscreteProcess, got {type(process).__name__}; for an SDE process use "
                             "DDIM, EulerMaruyama, PredictorCorrector or ODE")
        if self.steps is not None and self.steps > process.num_steps:
            raise ValueError(f"DDPM(steps={self.steps}) exceeds the process's T={process.num_steps} steps; "
                             f"choose steps <= {process.num_steps} or None")

    def sampling_process(self, process: ForwardProcess) -> ForwardProcess:
        """``process.respace(strided_steps(T, steps))`` when ``steps`` is set and below T, else ``process``."""
        self.check(process)
        if self.steps is None or self.steps == process.num_steps:
            return process
        return process.respace(strided_steps(process.num_steps, self.steps).tolist())

    def _grid(self, process: ForwardProcess) -> Tensor:
        return ddpm_grid(process.num_steps)

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        if self.steps is not None and process.num_steps != self.steps:
            raise ValueError(f"DDPM(steps={self.steps}) samples its respaced process: pass "
                             f"sampler.sampling_process(process) (and a denoiser bound to it), got a process of "
                             f"{process.num_steps} steps")
        return sample_ddpm(denoise, process, x_T, grid=grid, variance=self.variance, generator=generator,
                           progress=progress, project=project)


class DDIM(Sampler):
    """DDIM (Song et al. 2021a, eq. 12; :func:`~diffusion_pl.samplers.ddim.sample_ddim`) on any forward process.

    Args:
        steps: Number of steps: the strided sub-sequence of a discrete process's T steps, or intervals of
            :func:`~diffusion_pl.samplers.grids.sde_times` followed by a last step to t = 0 on an SDE.
        eta: Stochasticity in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior variance); above 0 only on a
            variance-preserving process (DiscreteProcess, VPSDE).
        spacing: Time spacing on an SDE, "uniform" or "log_snr" (a discrete process is always strided).
    """

    def __init__(self, steps: int = 50, eta: float = 0.0, spacing: TimeSpacing = "uniform") -> None:
        check_steps(steps)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
        check_spacing(spacing)
        self.steps = steps
        self.eta = eta
        self.spacing: TimeSpacing = spacing

    def check(self, process: ForwardProcess) -> None:
        """DDIM needs only alpha and sigma: a DiscreteProcess (steps <= T) or an SDEProcess, variance-preserving
        when eta > 0."""
        check_eta(process, self.eta)
        if isinstance(process, DiscreteProcess):
            if self.steps > process.num_steps:
                raise ValueError(f"DDIM(steps={self.steps}) exceeds the process's T={process.num_steps} steps; "
                                 f"choose steps <= {process.num_steps}")
        elif not isinstance(process, SDEProcess):
            raise ValueError(f"DDIM builds its grid on a DiscreteProcess or an SDEProcess, got "
                             f"{type(process).__name__}; pass an explicit grid to sample_ddim instead")

    def _grid(self, process: ForwardProcess) -> Tensor:
        if isinstance(process, DiscreteProcess):
            return strided_grid(process.num_steps, self.steps)
        return append_zero(sde_times(process, self.steps, self.spacing))

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_ddim(denoise, process, x_T, grid=grid, eta=self.eta, generator=generator, progress=progress,
                           project=project)


class _SDESampler(Sampler):
    """A sampler of the reverse-time SDE or the probability-flow ODE: needs an :class:`SDEProcess`; its grid is
    :func:`~diffusion_pl.samplers.grids.sde_times` (``steps`` intervals from t_max to t_min)."""

    steps: int
    spacing: TimeSpacing

    def check(self, process: ForwardProcess) -> None:
        """Score-SDE samplers need the drift and diffusion of an SDEProcess."""
        if not isinstance(process, SDEProcess):
            raise ValueError(f"{type(self).__name__} integrates the reverse-time SDE or probability-flow ODE and "
                             f"needs an SDEProcess (VPSDE, SubVPSDE or VESDE), got {type(process).__name__}; "
                             "for a DiscreteProcess use DDPM or DDIM")

    def _grid(self, process: ForwardProcess) -> Tensor:
        return sde_times(process, self.steps, self.spacing)


class EulerMaruyama(_SDESampler):
    """Euler–Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6;
    :func:`~diffusion_pl.samplers.sde.sample_euler_maruyama`).

    Args:
        steps: Number of steps N from t_max to t_min.
        spacing: "uniform" in t or "log_snr".
        denoise_final: End with the Tweedie estimate E[x_0 | x_{t_min}] (one more evaluation).
    """

    def __init__(self, steps: int = 1000, spacing: TimeSpacing = "uniform", denoise_final: bool = True) -> None:
        check_steps(steps)
        check_spacing(spacing)
        self.steps = steps
        self.spacing: TimeSpacing = spacing
        self.denoise_final = denoise_final

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_euler_maruyama(denoise, process, x_T, grid=grid, generator=generator, progress=progress,
                                     denoise_final=self.denoise_final, project=project)


class PredictorCorrector(_SDESampler):
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1; :func:`~diffusion_pl.samplers.sde.sample_pc`).

    Args:
        steps: Number of predictor steps N from t_max to t_min.
        spacing: "uniform" in t or "log_snr".
        predictor: "reverse_diffusion" (eq. 47) or "euler_maruyama".
        corrector_steps: Langevin steps per time step (0: predictor only).
        snr: The corrector's signal-to-noise ratio r.
        step_size_norm: Norms of the Langevin step size per "sample" (Alg. 4-5) or "batch" (score_sde's code).
        denoise_final: End with the Tweedie estimate E[x_0 | x_{t_min}] (one more evaluation).
    """

    def __init__(self, steps: int = 1000, spacing: TimeSpacing = "uniform",
                 predictor: Predictor = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.16,
                 step_size_norm: StepSizeNorm = "sample", denoise_final: bool = True) -> None:
        check_steps(steps)
        check_spacing(spacing)
        check_pc_options(predictor, corrector_steps, snr, step_size_norm)
        self.steps = steps
        self.spacing: TimeSpacing = spacing
        self.predictor: Predictor = predictor
        self.corrector_steps = corrector_steps
        self.snr = snr
        self.step_size_norm: StepSizeNorm = step_size_norm
        self.denoise_final = denoise_final

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_pc(denoise, process, x_T, grid=grid, predictor=self.predictor,
                         corrector_steps=self.corrector_steps, snr=self.snr, step_size_norm=self.step_size_norm,
                         generator=generator, progress=progress, denoise_final=self.denoise_final, project=project)


class ODE(_SDESampler):
    """The probability-flow ODE (Song et al. 2021, eq. 13; :func:`~diffusion_pl.samplers.ode.sample_ode`).

    Args:
        method: "euler", "heun" (fixed steps on the grid) or "rk45" (adaptive; refuses a per-step projection).
        steps: Steps of the fixed-step methods (ignored by rk45).
        spacing: Their time grid, "uniform" in t or "log_snr" (ignored by rk45).
        rtol: Relative tolerance of rk45.
        atol: Absolute tolerance of rk45.
        denoise_final: End with the Tweedie estimate E[x_0 | x_{t_min}] (one more evaluation).
    """

    def __init__(self, method: ODEMethod = "heun", steps: int = 100, spacing: TimeSpacing = "uniform",
                 rtol: float = 1e-5, atol: float = 1e-5, denoise_final: bool = True) -> None:
        check_ode_method(method)
        check_steps(steps)
        check_spacing(spacing)
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"the ODE tolerances must be positive, got rtol={rtol}, atol={atol}")
        self.method: ODEMethod = method
        self.steps = steps
        self.spacing: TimeSpacing = spacing
        self.rtol = rtol
        self.atol = atol
        self.denoise_final = denoise_final

    def _grid(self, process: ForwardProcess) -> Tensor:
        """The fixed-step grid, or for rk45 just its end points [t_max, t_min]."""
        if self.method != "rk45":
            return super()._grid(process)
        return torch.tensor([process.t_max, process.t_min], dtype=torch.float64)

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_ode(denoise, process, x_T, grid=grid, method=self.method, rtol=self.rtol, atol=self.atol,
                          generator=generator, progress=progress, denoise_final=self.denoise_final, project=project)


class _EDMSampler(Sampler):
    """A few-step ODE solver of :mod:`~diffusion_pl.samplers.edm` on any process with a time range (a
    DiscreteProcess, sampled at non-integer steps, or an SDEProcess), on the grid ``spacing.times(process, steps)``.

    Args:
        steps: Number of steps N (noise levels before the final step to the data).
        spacing: The time grid, a :class:`~diffusion_pl.samplers.timegrids.TimeGrid` part (Karras, Uniform,
            Trailing, LogSNR); None: ``Karras()`` (rho = 7 on the process's own sigma range).
    """

    def __init__(self, steps: int = 18, spacing: TimeGrid | None = None) -> None:
        check_steps(steps)
        if spacing is not None and not isinstance(spacing, TimeGrid):
            raise ValueError(f"{type(self).__name__} spacing must be a TimeGrid (Karras, Uniform, Trailing or "
                             f"LogSNR), got {type(spacing).__name__}")
        self.steps = steps
        self.spacing = spacing

    def check(self, process: ForwardProcess) -> None:
        """The solvers need alpha and sigma at real times of a DiscreteProcess or SDEProcess, and a grid of
        ``steps`` strictly decreasing times on it (Trailing rounds to integer steps, so at most T of them)."""
        if not isinstance(process, (DiscreteProcess, SDEProcess)):
            raise ValueError(f"{type(self).__name__} builds its grid on a DiscreteProcess or an SDEProcess, got "
                             f"{type(process).__name__}; pass an explicit grid to its sampling function instead")
        time_range(process)
        self._grid(process)

    def _grid(self, process: ForwardProcess) -> Tensor:
        return (self.spacing if self.spacing is not None else Karras()).times(process, self.steps)


class Euler(_EDMSampler):
    """Euler's method on the probability-flow ODE in EDM form (deterministic DDIM on any grid;
    :func:`~diffusion_pl.samplers.edm.sample_euler`). First order; one evaluation per step."""

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_euler(denoise, process, x_T, grid=grid, project=project, generator=generator, progress=progress)


class Heun(_EDMSampler):
    """Heun's method of Karras et al. 2022, Alg. 1 (:func:`~diffusion_pl.samplers.edm.sample_heun`): second order,
    2N - 1 evaluations (EDM: 18 steps, 35 evaluations, on CIFAR-10)."""

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_heun(denoise, process, x_T, grid=grid, project=project, generator=generator, progress=progress)


class DPMSolverPP(_EDMSampler):
    """DPM-Solver++(2M) of Lu et al. 2022b, Alg. 2 (:func:`~diffusion_pl.samplers.edm.sample_dpmpp_2m`): second
    order multistep, one evaluation per step (10-20 steps)."""

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_dpmpp_2m(denoise, process, x_T, grid=grid, project=project, generator=generator,
                               progress=progress)


class UniPC(_EDMSampler):
    """UniPC-p of Zhao et al. 2023 (:func:`~diffusion_pl.samplers.unipc.sample_unipc`): the multistep predictor UniP-p
    corrected by UniC-p with the next step's evaluation (B(h) = e^h - 1, data prediction); one evaluation per step,
    order p + 1 (5-20 steps).

    Args:
        steps: Number of steps N.
        spacing: The time grid part; None: ``Karras()``.
        order: p: 1, 2 (diffusers' default, advised for guided sampling) or 3 (advised for unguided).
    """

    def __init__(self, steps: int = 10, spacing: TimeGrid | None = None, order: int = 2) -> None:
        super().__init__(steps, spacing)
        check_unipc_order(order)
        self.order = order

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_unipc(denoise, process, x_T, grid=grid, order=self.order, project=project, generator=generator,
                            progress=progress)


class EDMStochastic(_EDMSampler):
    """EDM's stochastic sampler, Karras et al. 2022, Alg. 2
    (:func:`~diffusion_pl.samplers.edm_sde.sample_edm_stochastic`): Heun steps from a noise level raised by
    gamma_i = min(S_churn / N, sqrt(2) - 1) within [S_tmin, S_tmax].

    Args:
        steps: Number of steps N.
        spacing: The time grid part; None: ``Karras()``.
        s_churn: S_churn (0: Heun, Alg. 1; EDM's ImageNet-64 setting: 40 with S_tmin 0.05, S_tmax 50, S_noise 1.003).
        s_tmin: Smallest sigma~ at which noise is added.
        s_tmax: Largest sigma~ at which noise is added; None: no bound.
        s_noise: Standard deviation of the added noise.
    """

    def __init__(self, steps: int = 18, spacing: TimeGrid | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float | None = None, s_noise: float = 1.0) -> None:
        super().__init__(steps, spacing)
        check_churn(s_churn, s_tmin, s_tmax, s_noise)
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_edm_stochastic(denoise, process, x_T, grid=grid, s_churn=self.s_churn, s_tmin=self.s_tmin,
                                     s_tmax=self.s_tmax, s_noise=self.s_noise, project=project, generator=generator,
                                     progress=progress)


class DPMSolverPPSDE(_EDMSampler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5; :func:`~diffusion_pl.samplers.edm_sde.sample_dpmpp_2m_sde`):
    one evaluation per step, fresh noise sigma~_s sqrt(1 - e^{-2 eta h}) at every step.

    Args:
        steps: Number of steps N.
        spacing: The time grid part; None: ``Karras()``.
        eta: Stochasticity in [0, 1] (0: DPM-Solver++(2M)).
        s_noise: Scale of the added noise.
    """

    def __init__(self, steps: int = 25, spacing: TimeGrid | None = None, eta: float = 1.0,
                 s_noise: float = 1.0) -> None:
        super().__init__(steps, spacing)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DPM-Solver++(2M) SDE eta must be in [0, 1], got {eta}")
        if s_noise <= 0:
            raise ValueError(f"S_noise must be positive, got {s_noise}")
        self.eta = eta
        self.s_noise = s_noise

    def _run(self, denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor,
             generator: torch.Generator | None, progress: bool, project: ProjectFn | None) -> Tensor:
        return sample_dpmpp_2m_sde(denoise, process, x_T, grid=grid, eta=self.eta, s_noise=self.s_noise,
                                   project=project, generator=generator, progress=progress)
