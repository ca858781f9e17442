"""DDIM sampling on a strided sub-sequence of steps (Song, Meng & Ermon 2021, eq. 12)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.discrete import DiscreteProcess
from diffusion_pl.samplers.grids import strided_steps
from diffusion_pl.samplers.progress import maybe_progress
from diffusion_pl.utils import append_dims


@torch.no_grad()
def sample_ddim(denoise: DenoiseFn, process: DiscreteProcess, x_T: Tensor, *, steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DDIM: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - s_eta^2) eps_hat + s_eta z for consecutive tau_i = t > s.

    s_eta^2 = eta^2 (sigma_s^2 / sigma_t^2)(1 - alpha_t^2 / alpha_s^2) (Song et al. 2021a, eq. 16), with
    alpha = sqrt(alpha-bar) and sigma = sqrt(1 - alpha-bar). eta = 0 is the deterministic DDIM, eta = 1
    the DDPM posterior variance on the strided grid. The last step lands on s = 0, where x_0 = x0_hat.

    Args:
        denoise: (x_t, t) -> Prediction.
        process: The discrete forward process the denoiser was trained on.
        x_T: Prior sample.
        steps: Number of denoising steps S (1 <= S <= T).
        eta: Stochasticity in [0, 1].
        generator: Random generator on x_T's device (only used when eta > 0).
        progress: Show a progress bar.

    Returns:
        The sample x_0.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    grid = strided_steps(process.num_steps, steps).tolist()
    pairs = list(zip(reversed(grid), reversed([0] + grid[:-1])))
    x = x_T
    for t_step, s_step in maybe_progress(pairs, progress, total=len(pairs), desc="DDIM"):
        t = torch.full((x.shape[0],), t_step, device=x.device, dtype=torch.long)
        s = torch.full((x.shape[0],), s_step, device=x.device, dtype=torch.long)
        pred = denoise(x, t)
        alpha_t, alpha_s = process.alpha(t), process.alpha(s)
        sigma_t, sigma_s = process.sigma(t), process.sigma(s)
        s_eta = eta * (sigma_s / sigma_t) * (1 - (alpha_t / alpha_s) ** 2).clamp(min=0).sqrt()
        direction = (sigma_s**2 - s_eta**2).clamp(min=0).sqrt()
        x = append_dims(alpha_s, x.ndim) * pred.x0 + append_dims(direction, x.ndim) * pred.eps
        if eta > 0 and s_step > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + append_dims(s_eta, x.ndim) * noise
    return x
