"""Interpolation between two images with a trained model (Ho et al. 2020, Sec. 4.3; Song et al. 2021a, Sec. 5.3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.pipelines.model import (
    SamplingModel,
    run_sampler,
    sampling_process,
    start_grid,
    start_time,
)
from diffusion_pl.samplers import DDIM, invert_ddim, sample_ddim


def mix_noised(z: Tensor, z_prime: Tensor, lambdas: Tensor, alpha: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """x_bar_t = (1 - lambda) x_t + lambda x'_t with x_t = alpha z + sigma eps and x'_t = alpha z' + sigma eps (one
    shared eps): = alpha ((1 - lambda) z + lambda z') + sigma eps, so the noise keeps unit variance for every lambda.
    (Independent noises would leave sqrt((1 - lambda)^2 + lambda^2) of it: 0.71 at lambda = 1/2.)

    Args:
        z, z_prime: The two (1, ...) latents.
        lambdas: (L,) mixing weights.
        alpha, sigma: Scalars (0-d or (1,)) of the start time.
        noise: (1, ...) the shared eps.

    Returns:
        (L, ...) the mixed noisy latents.
    """
    lam = append_dims(lambdas.to(z), z.ndim)
    return alpha * ((1 - lam) * z + lam * z_prime) + sigma * noise


@torch.no_grad()
def interpolate(model: SamplingModel, x: Tensor, x_prime: Tensor, lambdas: Tensor, t: float, *,
                batch: dict[str, Any] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Interpolate in the noisy space (Ho et al. 2020, Sec. 4.3): noise both images to level t with the same eps,
    mix them, x_bar_t = (1 - lambda) x_t + lambda x'_t, and denoise x_bar_t from t with the model's sampler (its
    grid from t on).

    Args:
        model: A trained model (``DiffusionModule``).
        x, x_prime: Images (C, H, W) or (1, C, H, W) in [-1, 1].
        lambdas: (L,) weights; 0 gives back (a resample of) x, 1 of x'.
        t: Start level as a fraction of the time range, in (0, 1] (0.5: T/2). Larger t forgets more of the images.
        batch: Conditions of the L outputs (e.g. ``{"label": ...}``); none for unconditional sampling.
        generator: Random generator of the noise and of the sampler, on the model's device.

    Returns:
        (L, C, H, W) images in [-1, 1].
    """
    process = sampling_process(model)
    grid = start_grid(model.sampler.grid(process), t)
    z, z_prime = (model.first_stage.encode(image.reshape(1, *image.shape[-3:]).to(model.device))
                  for image in (x, x_prime))
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    t0 = start_time(grid, z)
    mixed = mix_noised(z, z_prime, lambdas.to(z.device), process.alpha(t0).reshape(()),
                       process.sigma(t0).reshape(()), noise)
    return run_sampler(model, mixed, batch=batch, grid=grid, generator=generator)


def slerp(z: Tensor, z_prime: Tensor, lambdas: Tensor) -> Tensor:
    """Spherical interpolation sin((1 - l) w) / sin w z + sin(l w) / sin w z', cos w = <z, z'> / (|z| |z'|) (Shoemake
    1985), which keeps Gaussian latents at their typical norm; linear when z and z' are parallel.

    Args:
        z, z_prime: (1, ...) latents.
        lambdas: (L,) weights.

    Returns:
        (L, ...).
    """
    a, b = z.flatten().double(), z_prime.flatten().double()
    omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    lam = lambdas.double().to(a.device)
    if float(omega.sin()) < 1e-6:
        weights = (1 - lam, lam)
    else:
        weights = (torch.sin((1 - lam) * omega) / omega.sin(), torch.sin(lam * omega) / omega.sin())
    out = weights[0][:, None] * a + weights[1][:, None] * b
    return out.to(z.dtype).reshape(len(lambdas), *z.shape[1:])


@torch.no_grad()
def interpolate_ddim(model: SamplingModel, x: Tensor, x_prime: Tensor, lambdas: Tensor, *, steps: int = 50,
                     batch: dict[str, Any] | None = None) -> Tensor:
    """Deterministic interpolation: DDIM inversion of both images to x_T (Song et al. 2021a, Sec. 4.3), spherical
    interpolation of the two latents, DDIM (eta = 0) back with the same ``steps``-step grid.

    Args:
        model: A trained model (``DiffusionModule``).
        x, x_prime: Images (C, H, W) or (1, C, H, W) in [-1, 1].
        lambdas: (L,) weights.
        steps: DDIM steps of the inversion and of the sampling.
        batch: Conditions of the L outputs; the inversions are unconditional unless it conditions two items.

    Returns:
        (L, C, H, W) images in [-1, 1].
    """
    process = model.process
    sampler = DDIM(steps=steps)
    sampler.check(process)
    grid = sampler.grid(process)
    pair = torch.cat([model.first_stage.encode(image.reshape(1, *image.shape[-3:]).to(model.device))
                      for image in (x, x_prime)])
    latents = invert_ddim(model.sampling_denoiser(process, {}), process, pair, grid=grid)
    mixed = slerp(latents[:1], latents[1:], lambdas)
    out = sample_ddim(model.sampling_denoiser(process, batch or {}), process, mixed, grid=grid)
    return model.first_stage.decode(out)
