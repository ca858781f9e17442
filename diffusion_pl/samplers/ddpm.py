"""Ancestral DDPM sampling (Ho et al. 2020, Alg. 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.core.progress import maybe_progress
from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.discrete import DiscreteProcess, FixedVariance
from diffusion_pl.samplers.grids import ddpm_grid


def check_ddpm_grid(grid: Tensor, num_steps: int) -> list[int]:
    """The steps of a DDPM grid t_0, t_0 - 1, ..., 1 with t_0 <= T, as Python ints; raise on any other grid."""
    steps = grid.tolist() if grid.ndim == 1 and not grid.is_floating_point() else None
    if not steps or steps[-1] != 1 or steps[0] > num_steps or any(a - b != 1 for a, b in zip(steps, steps[1:])):
        raise ValueError(f"DDPM steps through consecutive integer steps t_0, t_0 - 1, ..., 1 with t_0 <= T="
                         f"{num_steps} (e.g. ddpm_grid(T, t_0)); for fewer steps respace the process "
                         f"(DDPM(steps=...).sampling_process), got a grid of shape {tuple(grid.shape)}, "
                         f"dtype {grid.dtype}")
    return steps


@torch.no_grad()
def sample_ddpm(denoise: DenoiseFn, process: DiscreteProcess, x_T: Tensor, *, grid: Tensor | None = None,
                variance: FixedVariance = "beta", generator: torch.Generator | None = None, progress: bool = False,
                project: ProjectFn | None = None) -> Tensor:
    """Run the reverse chain x_{t_0} -> x_0 with p(x_{t-1} | x_t) = N(mu-tilde(x_t, x0_hat), sigma_t^2 I).

    The mean is the posterior mean q(x_{t-1} | x_t, x0 = x0_hat) (Ho et al. 2020, eq. 7), which equals
    Alg. 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha-bar_t) eps_hat) when x0_hat comes from eps_hat.
    The variance is the denoiser's learned one when it returns ``log_var``; otherwise sigma_t^2 = beta_t
    ("beta") or beta-tilde_t ("posterior") (Ho et al. 2020, Sec. 3.2). No noise is added at t = 1.

    Args:
        denoise: (x_t, t) -> Prediction, with t a long tensor of steps in 1..T.
        process: The discrete forward process the denoiser was trained on, or a respaced one
            (:meth:`DiscreteProcess.respace`) with the denoiser bound to it.
        x_T: Sample at the grid's first step, e.g. ``process.prior_sample(shape)``.
        grid: The steps t_0, t_0 - 1, ..., 1 (:func:`~diffusion_pl.samplers.grids.ddpm_grid`); default T..1.
        variance: Fixed reverse variance used when the denoiser has no learned variance.
        generator: Random generator on x_T's device, for reproducible samples.
        progress: Show a progress bar.
        project: Optional (x, s) -> x applied after every step, s = t - 1 the (B,) step just reached.

    Returns:
        The sample x_0, same shape as x_T.
    """
    check_variance(variance)
    steps = check_ddpm_grid(ddpm_grid(process.num_steps) if grid is None else grid, process.num_steps)
    x = x_T
    for step in maybe_progress(steps, progress, total=len(steps), desc="DDPM"):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x = ddpm_step(denoise, process, x, t, variance, generator, add_noise=step > 1)
        if project is not None:
            x = project(x, t - 1)
    return x


def check_variance(variance: str) -> None:
    """Raise unless ``variance`` names a fixed reverse variance."""
    if variance not in ("beta", "posterior"):
        raise ValueError(f"unknown DDPM variance {variance!r}; choose 'beta' or 'posterior'")


def ddpm_step(denoise: DenoiseFn, process: DiscreteProcess, x: Tensor, t: Tensor, variance: FixedVariance,
              generator: torch.Generator | None, add_noise: bool = True) -> Tensor:
    """One ancestral step x_t -> x_{t-1} ~ N(mu-tilde(x_t, x0_hat), sigma_t^2 I) (Ho et al. 2020, Alg. 2, line 4) at
    the (B,) steps ``t``; the mean alone when not ``add_noise`` (the last step, t = 1)."""
    pred = denoise(x, t)
    mean, _ = process.posterior(pred.x0, x, t)
    if not add_noise:
        return mean
    log_var = pred.log_var if pred.log_var is not None else append_dims(process.fixed_log_variance(t, variance), x.ndim)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + (0.5 * log_var).exp() * noise
