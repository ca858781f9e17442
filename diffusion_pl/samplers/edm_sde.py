"""Stochastic few-step samplers in the EDM form x~ = x / alpha, sigma~ = sigma / alpha of any forward process (see
:mod:`diffusion_pl.samplers.edm`): EDM's stochastic sampler (Karras et al. 2022, Alg. 2) and DPM-Solver++(2M) SDE
(Lu et al. 2022b, Sec. 5 / k-diffusion's sample_dpmpp_2m_sde)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.noise_levels import sigma_range, times_at_sigmas
from diffusion_pl.samplers.edm import (
    _finish,
    _steps,
    at_pure_noise,
    dpmpp_2m_loop,
    heun_step,
    noise_level,
    pure_noise_step,
)


def check_churn(s_churn: float, s_tmin: float, s_tmax: float | None, s_noise: float) -> None:
    """Raise unless S_churn >= 0, 0 <= S_tmin < S_tmax (None: no upper bound) and S_noise > 0."""
    if s_churn < 0:
        raise ValueError(f"S_churn must be >= 0, got {s_churn}")
    if s_tmin < 0 or (s_tmax is not None and s_tmax <= s_tmin):
        raise ValueError(f"need 0 <= S_tmin < S_tmax, got S_tmin={s_tmin}, S_tmax={s_tmax}")
    if s_noise <= 0:
        raise ValueError(f"S_noise must be positive, got {s_noise}")


def churn(sigma: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float | None) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) for S_tmin <= sigma_i <= S_tmax, else 0 (Karras et al. 2022, Alg. 2)."""
    inside = s_tmin <= sigma <= (math.inf if s_tmax is None else s_tmax)
    return min(s_churn / steps, math.sqrt(2) - 1) if inside and sigma > 0 else 0.0


@torch.no_grad()
def sample_edm_stochastic(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor,
                          s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float | None = None,
                          s_noise: float = 1.0, project: ProjectFn | None = None,
                          generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): before each Heun step from sigma~_i, raise the noise
    level to sigma^_i = (1 + gamma_i) sigma~_i by adding sqrt(sigma^_i^2 - sigma~_i^2) S_noise z, then take the
    step (:func:`~diffusion_pl.samplers.edm.heun_step`) from sigma^_i. S_churn = 0 is Alg. 1.

    sigma^_i is evaluated at its time on the process (:func:`~diffusion_pl.samplers.timegrids.times_at_sigmas`),
    so the process must be a DiscreteProcess or an SDEProcess; it is capped at the process's largest sigma~ (the
    net is not trained above it), which shrinks gamma on a first step that starts there.

    Args:
        denoise, process, x_T, grid, project, progress: As :func:`~diffusion_pl.samplers.edm.sample_euler`.
        s_churn: S_churn, the total stochasticity (gamma_i = min(S_churn / N, sqrt(2) - 1)).
        s_tmin, s_tmax: The range of sigma~ in which noise is added (s_tmax None: no upper bound).
        s_noise: S_noise, the added noise's standard deviation (slightly above 1 offsets the denoiser's bias).
        generator: Random generator of the added noise, on x_T's device.

    Returns:
        The sample at the grid's last time.
    """
    check_churn(s_churn, s_tmin, s_tmax, s_noise)
    steps, top = len(grid) - 1, sigma_range(process)[1] if s_churn > 0 else math.inf
    x = x_T
    for t, s in _steps(grid, "EDM", x_T, progress):
        alpha_t, sigma_t = noise_level(process, t)
        if at_pure_noise(alpha_t):
            x = _finish(pure_noise_step(denoise, process, x, t, s), s, project)
            continue
        x_tilde = x / append_dims(alpha_t, x.ndim)
        gamma = churn(float(sigma_t[0]), steps, s_churn, s_tmin, s_tmax)
        raised = min(float(sigma_t[0]) * (1 + gamma), top)
        if raised > float(sigma_t[0]):
            t = times_at_sigmas(process, torch.tensor([raised], dtype=torch.float64)).to(x).expand(x.shape[0])
            sigma_hat = noise_level(process, t)[1]
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_tilde = x_tilde + append_dims((sigma_hat**2 - sigma_t**2).clamp(min=0).sqrt(), x.ndim) * s_noise * noise
            sigma_t = sigma_hat
        x_tilde = heun_step(denoise, process, x_tilde, t, sigma_t, s)
        x = _finish(append_dims(process.alpha(s), x.ndim) * x_tilde, s, project)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor, eta: float = 1.0,
                        s_noise: float = 1.0, project: ProjectFn | None = None,
                        generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5; the midpoint form of k-diffusion's sample_dpmpp_2m_sde): with
    h = log(sigma~_t / sigma~_s) and data estimates D_t, D_prev (r = h_prev / h),

        x~_s = (sigma~_s / sigma~_t) e^{-eta h} x~_t + (1 - e^{-(1 + eta) h}) (D_t + (D_t - D_prev) / (2r))
               + sigma~_s sqrt(1 - e^{-2 eta h}) S_noise z,

    first order (no D_prev term) on the first step, and x = D_t on a step to sigma~ = 0. eta = 1 is the reverse SDE
    discretized exactly in its linear part; eta = 0 is DPM-Solver++(2M).

    Args:
        denoise, process, x_T, grid, project, progress: As :func:`~diffusion_pl.samplers.edm.sample_euler`.
        eta: Stochasticity in [0, 1].
        s_noise: Scale of the added noise.
        generator: Random generator of the added noise, on x_T's device.

    Returns:
        The sample at the grid's last time.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DPM-Solver++(2M) SDE eta must be in [0, 1], got {eta}")
    return dpmpp_2m_loop(denoise, process, x_T, grid, "DPM-Solver++(2M) SDE", eta=eta, s_noise=s_noise,
                         project=project, generator=generator, progress=progress)
