"""Ancestral DDPM sampling (Ho et al. 2020, Alg. 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.discrete import DiscreteProcess, FixedVariance
from diffusion_pl.samplers.progress import maybe_progress
from diffusion_pl.utils import append_dims


@torch.no_grad()
def sample_ddpm(denoise: DenoiseFn, process: DiscreteProcess, x_T: Tensor, *, variance: FixedVariance = "beta",
                generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Run the reverse chain x_T -> x_0 with p(x_{t-1} | x_t) = N(mu-tilde(x_t, x0_hat), sigma_t^2 I).

    The mean is the posterior mean q(x_{t-1} | x_t, x0 = x0_hat) (Ho et al. 2020, eq. 7), which equals
    Alg. 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha-bar_t) eps_hat) when x0_hat comes from eps_hat.
    The variance is the denoiser's learned one when it returns ``log_var``; otherwise sigma_t^2 = beta_t
    ("beta") or beta-tilde_t ("posterior") (Ho et al. 2020, Sec. 3.2). No noise is added at t = 1.

    Args:
        denoise: (x_t, t) -> Prediction, with t a long tensor of steps in 1..T.
        process: The discrete forward process the denoiser was trained on.
        x_T: Prior sample, e.g. ``process.prior_sample(shape)``.
        variance: Fixed reverse variance used when the denoiser has no learned variance.
        generator: Random generator on x_T's device, for reproducible samples.
        progress: Show a progress bar.

    Returns:
        The sample x_0, same shape as x_T.
    """
    if variance not in ("beta", "posterior"):
        raise ValueError(f"unknown DDPM variance {variance!r}; choose 'beta' or 'posterior'")
    x = x_T
    steps = range(process.num_steps, 0, -1)
    for step in maybe_progress(steps, progress, total=process.num_steps, desc="DDPM"):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        pred = denoise(x, t)
        mean, _ = process.posterior(pred.x0, x, t)
        if step == 1:
            return mean
        log_var = pred.log_var if pred.log_var is not None else append_dims(
            process.fixed_log_variance(t, variance), x.ndim)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + (0.5 * log_var).exp() * noise
    return x
