"""DDIM sampling on a decreasing time grid (Song, Meng & Ermon 2021, eq. 12)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.core.progress import maybe_progress
from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.samplers.grids import grid_pairs


def variance_preserving(process: ForwardProcess) -> bool:
    """Whether alpha^2 + sigma^2 = 1 at every probe time, to float32 precision (DDPM and VP; not sub-VP or VE)."""
    marginals = process.marginals()
    return float((marginals["alpha"] ** 2 + marginals["sigma"] ** 2 - 1).abs().max()) <= 1e-4


def check_eta(process: ForwardProcess, eta: float) -> None:
    """Raise unless eta is in [0, 1], and 0 when the process is not variance-preserving (alpha^2 + sigma^2 = 1 at
    every probe time), where eq. 16's s_eta is not the posterior's standard deviation: it can exceed sigma_s
    (sub-VP, breaking the marginals) or vanish (VE, alpha constant)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    if eta > 0 and not variance_preserving(process):
        raise ValueError(f"DDIM with eta > 0 needs a variance-preserving process (alpha^2 + sigma^2 = 1, e.g. a "
                         f"DiscreteProcess or VPSDE), got {type(process).__name__}; use eta=0 (deterministic DDIM), "
                         "or EulerMaruyama / PredictorCorrector for a stochastic sampler")


@torch.no_grad()
def sample_ddim(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: bool = False,
                project: ProjectFn | None = None) -> Tensor:
    """DDIM: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - s_eta^2) eps_hat + s_eta z for consecutive grid times t > s.

    s_eta^2 = eta^2 (sigma_s^2 / sigma_t^2)(1 - alpha_t^2 / alpha_s^2) (Song et al. 2021a, eq. 16). eta = 0 is
    the deterministic DDIM, eta = 1 the DDPM posterior variance on the grid; that form of s_eta assumes a
    variance-preserving process (alpha^2 + sigma^2 = 1), so eta > 0 is refused on others (sub-VP, VE).

    Only alpha and sigma are used, so any forward process works: a discrete one with alpha = sqrt(alpha-bar) (an
    integer grid such as :func:`~diffusion_pl.samplers.grids.strided_grid`) or an SDE (a float grid, e.g.
    ``append_zero(sde_times(...))``; its times are cast to x_T's dtype like the other SDE samplers'). A grid
    ending at 0 lands on
    x_0 = alpha(0) x0_hat + sigma(0) eps_hat: x0_hat for DDPM, VP and sub-VP; VE keeps its sigma_min (the
    process's convention for x(0), see :class:`~diffusion_pl.processes.sde.VESDE`).

    Args:
        denoise: (x_t, t) -> Prediction.
        process: The forward process the denoiser was trained on.
        x_T: Sample at the grid's first time (prior noise when that is T; a noised image for SDEdit).
        grid: Strictly decreasing 1-D tensor of times t_0 > ... > t_end >= 0; the output is at t_end.
        eta: Stochasticity in [0, 1].
        generator: Random generator on x_T's device (only used when eta > 0).
        progress: Show a progress bar.
        project: Optional (x, s) -> x applied after every step, s the (B,) time just reached.

    Returns:
        The sample at the grid's last time.
    """
    check_eta(process, eta)
    pairs = grid_pairs(grid, "DDIM")
    dtype = x_T.dtype if grid.is_floating_point() else torch.long
    x = x_T
    for t_step, s_step in maybe_progress(pairs, progress, total=len(pairs), desc="DDIM"):
        t = torch.full((x.shape[0],), t_step, device=x.device, dtype=dtype)
        s = torch.full((x.shape[0],), s_step, device=x.device, dtype=dtype)
        pred = denoise(x, t)
        alpha_t, alpha_s = process.alpha(t), process.alpha(s)
        sigma_t, sigma_s = process.sigma(t), process.sigma(s)
        s_eta = eta * (sigma_s / sigma_t) * (1 - (alpha_t / alpha_s) ** 2).clamp(min=0).sqrt()
        direction = (sigma_s**2 - s_eta**2).clamp(min=0).sqrt()
        x = append_dims(alpha_s, x.ndim) * pred.x0 + append_dims(direction, x.ndim) * pred.eps
        if eta > 0 and s_step > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + append_dims(s_eta, x.ndim) * noise
        if project is not None:
            x = project(x, s)
    return x


@torch.no_grad()
def invert_ddim(denoise: DenoiseFn, process: ForwardProcess, x0: Tensor, *, grid: Tensor,
                progress: bool = False) -> Tensor:
    """DDIM inversion: the deterministic DDIM update (eta = 0) run up the grid, from x_s to x_t (s < t):
    x_t = alpha_t (x_s - sigma_s eps_hat) / alpha_s + sigma_t eps_hat, with eps_hat = eps_theta(x_s, s) (at s = 0,
    where the net is not trained and x_s is the data, eps_theta(x_0, t)).

    It maps data to the latent that :func:`sample_ddim` with the same grid and eta = 0 maps back, up to the
    discretization error of the probability-flow ODE both integrate (Song et al. 2021a, Sec. 4.3 and eq. 14).

    Args:
        denoise: (x_t, t) -> Prediction.
        process: The forward process.
        x0: The data, at the grid's last time.
        grid: The decreasing grid of :func:`sample_ddim` (e.g. ``strided_grid(T, S)``); it is walked backwards.
        progress: Show a progress bar.

    Returns:
        The latent at the grid's first time.
    """
    pairs = grid_pairs(grid, "DDIM inversion")[::-1]
    dtype = x0.dtype if grid.is_floating_point() else torch.long
    x = x0
    for t_step, s_step in maybe_progress(pairs, progress, total=len(pairs), desc="DDIM inversion"):
        t = torch.full((x.shape[0],), t_step, device=x.device, dtype=dtype)
        s = torch.full((x.shape[0],), s_step, device=x.device, dtype=dtype)
        eps = denoise(x, s if s_step > 0 else t).eps
        x0_hat = (x - append_dims(process.sigma(s), x.ndim) * eps) / append_dims(process.alpha(s), x.ndim)
        x = append_dims(process.alpha(t), x.ndim) * x0_hat + append_dims(process.sigma(t), x.ndim) * eps
    return x
