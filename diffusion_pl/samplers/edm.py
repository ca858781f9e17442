"""Few-step probability-flow ODE solvers in the EDM form of any forward process (Karras et al. 2022, Sec. 2-4).

Every Gaussian process x_t = alpha(t) x0 + sigma(t) eps is a rescaled x~ = x_t / alpha(t) = x0 + sigma~ eps at the
noise level sigma~(t) = sigma(t) / alpha(t) (Karras et al. 2022, eq. 4 and Table 1), whose probability-flow ODE
is dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~ with the denoiser D = E[x0 | x_t] (eq. 3 with s = 1). So one
implementation serves every process: the solvers only call the DenoiseFn at (alpha(t) x~, t) and read alpha, sigma.

The grid is a decreasing 1-D tensor of process times (e.g. :meth:`~diffusion_pl.samplers.timegrids.TimeGrid.times`);
a last time of 0 is the data, sigma~ = 0 (on VE too, whose sigma(0) = sigma_min is the process's convention for
x(0), not a noise level to stop at). Steps to sigma~ = 0 are first order: x = D (EDM's Alg. 1, line 8). So are steps
from alpha = 0 (the T of a zero-terminal-SNR process, Lin et al. 2024), where sigma~ is infinite and x~ undefined:
:func:`pure_noise_step`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from diffusion_pl.core.progress import maybe_progress
from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.samplers.grids import grid_pairs


def noise_level(process: ForwardProcess, t: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha(t), sigma~(t) = sigma(t) / alpha(t)), each (B,); sigma~ = 0 at t = 0 (the data)."""
    alpha = process.alpha(t)
    return alpha, torch.where(t == 0, torch.zeros_like(alpha), process.sigma(t) / alpha)


def _steps(grid: Tensor, name: str, x_T: Tensor, progress: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """(t, s) for the consecutive grid times t > s, as (B,) tensors in x_T's dtype."""
    pairs = grid_pairs(grid, name)
    for t_step, s_step in maybe_progress(pairs, progress, total=len(pairs), desc=name):
        yield _full(x_T, t_step), _full(x_T, s_step)


def _full(x: Tensor, time: float) -> Tensor:
    return torch.full((x.shape[0],), time, device=x.device, dtype=x.dtype)


def _denoised(denoise: DenoiseFn, process: ForwardProcess, x_tilde: Tensor, t: Tensor) -> Tensor:
    """D(x~; sigma~(t)): the data estimate at x_t = alpha(t) x~."""
    return denoise(append_dims(process.alpha(t), x_tilde.ndim) * x_tilde, t).x0


def at_pure_noise(alpha_t: Tensor) -> bool:
    """Whether the step starts where alpha(t) = 0 (pure noise: the T of a zero-terminal-SNR process)."""
    return bool((alpha_t == 0).all())


def pure_noise_step(denoise: DenoiseFn, process: ForwardProcess, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """The step from x_t at alpha(t) = 0 to time s, the limit sigma~_t -> inf of every solver's update: DDIM's
    x_s = alpha_s (D + sigma~_s x_t / sigma_t) (Song et al. 2021a, eq. 12 with eta = 0, eps = x_t / sigma_t at
    alpha_t = 0). Euler's ratio sigma~_s / sigma~_t and DPM-Solver++'s e^{-h} tend to 0 there, and a second-order
    correction across an infinite step is undefined, so the step is first order; the stochastic solvers take it
    too (their noise starts at the next step)."""
    alpha_s, sigma_s = noise_level(process, s)
    x0_hat = denoise(x, t).x0
    return append_dims(alpha_s, x.ndim) * (x0_hat + append_dims(sigma_s / process.sigma(t), x.ndim) * x)


def _finish(x: Tensor, s: Tensor, project: ProjectFn | None) -> Tensor:
    """Apply the projection at the time s just reached."""
    return x if project is None else project(x, s)


@torch.no_grad()
def sample_euler(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor,
                 project: ProjectFn | None = None,
                 generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Euler's method on the ODE in sigma~ (Karras et al. 2022, Alg. 1 without its correction):
    x~_s = x~_t + (sigma~_s - sigma~_t)(x~_t - D_t) / sigma~_t
         = (sigma~_s / sigma~_t) x~_t + (1 - sigma~_s / sigma~_t) D_t.

    This is deterministic DDIM (Song et al. 2021a, eq. 13 is Euler in sigma~; Karras et al. 2022, Sec. 3), first
    order: its error falls like 1/N.

    Args:
        denoise: (x_t, t) -> Prediction under ``process`` (guided or not; only its x0 is used).
        process: The forward process.
        x_T: Sample at the grid's first time.
        grid: Strictly decreasing times t_0 > ... > t_end >= 0 (float, or integer steps); output at t_end.
        project: Optional (x, s) -> x applied after every step (inpainting by replacement).
        generator: Unused (the solver is deterministic); taken for a uniform signature.
        progress: Show a progress bar.

    Returns:
        The sample at the grid's last time.
    """
    x = x_T
    for t, s in _steps(grid, "Euler", x_T, progress):
        (alpha_t, sigma_t), (alpha_s, sigma_s) = noise_level(process, t), noise_level(process, s)
        if at_pure_noise(alpha_t):
            x = _finish(pure_noise_step(denoise, process, x, t, s), s, project)
            continue
        x0_hat = denoise(x, t).x0
        ratio = append_dims(sigma_s / sigma_t, x.ndim)
        x = append_dims(alpha_s, x.ndim) * (ratio * x / append_dims(alpha_t, x.ndim) + (1 - ratio) * x0_hat)
        x = _finish(x, s, project)
    return x


@torch.no_grad()
def sample_heun(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor,
                project: ProjectFn | None = None,
                generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1): with d(x~, t) = (x~ - D(x~; sigma~_t)) / sigma~_t,
    the Euler proposal x~' = x~_t + (sigma~_s - sigma~_t) d(x~_t, t) is corrected to
    x~_s = x~_t + (sigma~_s - sigma~_t)(d(x~_t, t) + d(x~', s)) / 2, except on a last step to sigma~_s = 0, which
    stays Euler (x = D). Two evaluations per step (one on the last); the error falls like 1/N^2.

    Args: as :func:`sample_euler`.

    Returns:
        The sample at the grid's last time.
    """
    x = x_T
    for t, s in _steps(grid, "Heun", x_T, progress):
        alpha_t, sigma_t = noise_level(process, t)
        if at_pure_noise(alpha_t):
            x = _finish(pure_noise_step(denoise, process, x, t, s), s, project)
            continue
        x_tilde = heun_step(denoise, process, x / append_dims(alpha_t, x.ndim), t, sigma_t, s)
        x = _finish(append_dims(process.alpha(s), x.ndim) * x_tilde, s, project)
    return x


def heun_step(denoise: DenoiseFn, process: ForwardProcess, x_tilde: Tensor, t: Tensor, sigma_t: Tensor,
              s: Tensor) -> Tensor:
    """One step of Karras et al. 2022, Alg. 1 (lines 4-8) from x~ at time t (noise level ``sigma_t``) to time s:
    x~_s."""
    sigma_s = noise_level(process, s)[1]
    x0_hat = _denoised(denoise, process, x_tilde, t)
    slope = (x_tilde - x0_hat) / append_dims(sigma_t, x_tilde.ndim)
    step = append_dims(sigma_s - sigma_t, x_tilde.ndim)
    proposal = x_tilde + step * slope
    if bool((sigma_s > 0).all()):
        corrected = (proposal - _denoised(denoise, process, proposal, s)) / append_dims(sigma_s, x_tilde.ndim)
        proposal = x_tilde + step * 0.5 * (slope + corrected)
    return proposal


@torch.no_grad()
def sample_dpmpp_2m(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor,
                    project: ProjectFn | None = None,
                    generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), data prediction, multistep, in lambda = -log sigma~:
    with h = lambda_s - lambda_t = log(sigma~_t / sigma~_s),

        x~_s = (sigma~_s / sigma~_t) x~_t - (e^{-h} - 1) D',  D' = (1 + 1/(2r)) D_t - 1/(2r) D_prev,  r = h_prev / h.

    The first step is first order (D' = D_t, DPM-Solver++(1) = DDIM), as is a step to sigma~_s = 0 (x = D_t; the
    "lower-order final step" of k-diffusion's sample_dpmpp_2m and diffusers' lower_order_final). One evaluation
    per step; the error falls like 1/N^2.

    Args: as :func:`sample_euler`.

    Returns:
        The sample at the grid's last time.
    """
    return dpmpp_2m_loop(denoise, process, x_T, grid, "DPM-Solver++(2M)", eta=0.0, s_noise=0.0, project=project,
                         generator=generator, progress=progress)


def dpmpp_2m_loop(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, grid: Tensor, name: str, *, eta: float,
                  s_noise: float, project: ProjectFn | None,
                  generator: torch.Generator | None, progress: bool) -> Tensor:
    """The steps of DPM-Solver++(2M) and its SDE form (eta = 0: :func:`sample_dpmpp_2m`; eta > 0:
    :func:`~diffusion_pl.samplers.edm_sde.sample_dpmpp_2m_sde`, whose docstring has the update)."""
    x, previous = x_T, None  # previous: (D_prev, h_prev)
    for t, s in _steps(grid, name, x_T, progress):
        (alpha_t, sigma_t), (alpha_s, sigma_s) = noise_level(process, t), noise_level(process, s)
        if at_pure_noise(alpha_t):  # then D_prev stays unset: the next step is first order too
            x = _finish(pure_noise_step(denoise, process, x, t, s), s, project)
            continue
        x0_hat = denoise(x, t).x0
        if not bool((sigma_s > 0).all()):
            x = _finish(append_dims(alpha_s, x.ndim) * x0_hat, s, project)
            continue
        h = (sigma_t / sigma_s).log()
        data = x0_hat
        if previous is not None:
            half_inv_r = append_dims(0.5 * h / previous[1], x.ndim)
            data = x0_hat + half_inv_r * (x0_hat - previous[0])
        x_tilde = (append_dims(sigma_s / sigma_t * (-eta * h).exp(), x.ndim) * x / append_dims(alpha_t, x.ndim)
                   - append_dims(torch.expm1(-(1 + eta) * h), x.ndim) * data)
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_tilde = x_tilde + append_dims(sigma_s * (-torch.expm1(-2 * eta * h)).sqrt(), x.ndim) * s_noise * noise
        x = _finish(append_dims(alpha_s, x.ndim) * x_tilde, s, project)
        previous = (x0_hat, h)
    return x
