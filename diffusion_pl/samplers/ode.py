"""Probability-flow ODE (Song et al. 2021, eq. 13): sampling and encoding through
:func:`~diffusion_pl.processes.ode.integrate_ode`."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.core.project import ProjectFn
from diffusion_pl.parameterization import DenoiseFn, probability_flow
from diffusion_pl.processes.ode import ODEMethod, check_ode_method, integrate_ode
from diffusion_pl.processes.sde import SDEProcess
from diffusion_pl.samplers.grids import grid_times
from diffusion_pl.samplers.sde import finish


@torch.no_grad()
def sample_ode(denoise: DenoiseFn, process: SDEProcess, x_T: Tensor, *, grid: Tensor | None = None,
               method: ODEMethod = "heun", rtol: float = 1e-5, atol: float = 1e-5,
               generator: torch.Generator | None = None, progress: bool = False, denoise_final: bool = True,
               stats: dict[str, int] | None = None, project: ProjectFn | None = None) -> Tensor:
    """Sample by integrating the probability-flow ODE (Song et al. 2021, eq. 13) down a decreasing time grid.

    Args:
        denoise: (x_t, t) -> Prediction, with t a float tensor of shape (B,).
        process: The SDE the denoiser was trained on.
        x_T: Sample at the grid's first time.
        grid: Strictly decreasing times, e.g. :func:`~diffusion_pl.samplers.grids.sde_times`: the steps of the
            fixed-step methods (Heun: 2 evaluations per step). rk45 uses only its end points and chooses its own
            steps; it may be None there, meaning t_max to t_min.
        method: "euler", "heun" or "rk45" (see :func:`integrate_ode`).
        rtol: Relative tolerance of rk45.
        atol: Absolute tolerance of rk45.
        generator: Unused (the ODE is deterministic); accepted so that every sampler has the same call shape.
        progress: Show a progress bar.
        denoise_final: Return E[x_0 | x_{t_end}] (one more evaluation) instead of x(t_end) at the grid's end.
        stats: If given, receives the solver's statistics (see :func:`integrate_ode`).
        project: Optional (x, s) -> x applied after every step, s the (B,) time just reached (0 after the final
            denoising); fixed-step methods only, rk45 raises.

    Returns:
        The sample; with ``denoise_final=False`` it inverts :func:`encode_ode` up to solver error.
    """
    check_ode_method(method)
    if grid is None and method != "rk45":
        raise ValueError(f"the fixed-step ODE method {method!r} needs a grid, e.g. sde_times(process, 100)")
    times = [process.t_max, process.t_min] if grid is None else grid_times(grid, "the ODE sampler")
    x = integrate_ode(probability_flow(denoise, process), x_T, times[0], times[-1], method=method,
                      times=None if method == "rk45" else times, rtol=rtol, atol=atol, progress=progress,
                      stats=stats, project=project)
    return finish(denoise, x, times[-1], denoise_final, project)


@torch.no_grad()
def encode_ode(denoise: DenoiseFn, process: SDEProcess, x0: Tensor, *, method: ODEMethod = "rk45", steps: int = 100,
               rtol: float = 1e-5, atol: float = 1e-5, progress: bool = False,
               stats: dict[str, int] | None = None) -> Tensor:
    """Encode data into the latent x(1) by integrating the probability-flow ODE from t_min to 1 (Song et al.
    2021, Sec. 4.3, "identifiable encoding"). ``x0`` is taken as x(t_min).

    Args:
        denoise: (x_t, t) -> Prediction.
        process: The SDE the denoiser was trained on.
        x0: Data (treated as the state at t_min).
        method: "euler", "heun" or "rk45".
        steps: Steps of the fixed-step methods.
        rtol: Relative tolerance of rk45.
        atol: Absolute tolerance of rk45.
        progress: Show a progress bar.
        stats: If given, receives the solver's statistics.

    Returns:
        The latent x(1); ``sample_ode(..., denoise_final=False)`` maps it back.
    """
    return integrate_ode(probability_flow(denoise, process), x0, process.t_min, process.t_max, method=method,
                         steps=steps, rtol=rtol, atol=atol, progress=progress, stats=stats)
