"""Reverse-time SDE samplers: Euler–Maruyama and predictor–corrector (Song et al. 2021, Sec. 4.2, Alg. 1-5).

Both walk a decreasing grid of times, usually t_N = 1 > ... > t_0 = t_min from :func:`sde_times` (uniform in t,
or in log-SNR), and use the score s(x, t) = -eps_hat / sigma(t) of the denoiser. With ``denoise_final`` the sample
at the grid's last time is replaced by the denoiser's E[x_0 | x_t] there (Tweedie's formula), one extra network
evaluation; it counts as a step to t = 0 for the projection.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.core.progress import maybe_progress
from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.tensors import append_dims, batch_time
from diffusion_pl.parameterization import DenoiseFn, score_from_eps
from diffusion_pl.processes.sde import SDEProcess
from diffusion_pl.samplers.grids import grid_pairs

Predictor = Literal["reverse_diffusion", "euler_maruyama"]
StepSizeNorm = Literal["sample", "batch"]
PREDICTORS: tuple[str, ...] = ("reverse_diffusion", "euler_maruyama")
STEP_SIZE_NORMS: tuple[str, ...] = ("sample", "batch")


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _score(denoise: DenoiseFn, process: SDEProcess, x: Tensor, t: Tensor) -> Tensor:
    return score_from_eps(denoise(x, t).eps, t, process)


def finish(denoise: DenoiseFn, x: Tensor, t_end: float, denoise_final: bool, project: ProjectFn | None) -> Tensor:
    """The sampler's output at the grid's last time t_end: x itself, or with ``denoise_final`` the Tweedie estimate
    E[x_0 | x_{t_end}] = (x + sigma^2 score) / alpha, i.e. the denoiser's x0, then projected at t = 0."""
    if not denoise_final:
        return x
    x = denoise(x, batch_time(t_end, x)).x0
    return x if project is None else project(x, batch_time(0.0, x))


def euler_maruyama_step(denoise: DenoiseFn, process: SDEProcess, x: Tensor, t: float, s: float,
                        generator: torch.Generator | None) -> Tensor:
    """One Euler–Maruyama step of the reverse SDE (Song et al. 2021, eq. 6) from t down to s < t:

    x_s = x_t - (f - g^2 score)(t - s) + g sqrt(t - s) z.
    """
    tt = batch_time(t, x)
    drift = process.reverse_drift(x, tt, _score(denoise, process, x, tt))
    _, diffusion = process.sde(x, tt)
    return x - drift * (t - s) + append_dims(diffusion, x.ndim) * (t - s) ** 0.5 * _noise(x, generator)


def reverse_diffusion_step(denoise: DenoiseFn, process: SDEProcess, x: Tensor, t: float, s: float,
                           generator: torch.Generator | None) -> Tensor:
    """Reverse-diffusion predictor from t down to s (Song et al. 2021, eq. 46-47; Alg. 2 and 3).

    For the exact forward step x_t = a x_s + sqrt(v) z (:meth:`ForwardProcess.transition`), i.e. the
    discretization x_t = x_s + f_i + G_i z with f_i = (a - 1) x_s and G_i^2 = v, the reverse step is
    x_s = x_t - f_i(x_t) + G_i^2 score + G_i z = (2 - a) x_t + v score + sqrt(v) z. This is Alg. 3's
    (2 - sqrt(1 - beta_i)) x + beta_i s + sqrt(beta_i) z for VP (beta_i = 1 - a^2) and Alg. 2's
    x + (sigma_t^2 - sigma_s^2) s + sqrt(sigma_t^2 - sigma_s^2) z for VE.
    """
    tt = batch_time(t, x)
    a, v = process.transition(batch_time(s, x), tt)
    score = _score(denoise, process, x, tt)
    a, v = append_dims(a, x.ndim), append_dims(v.clamp(min=0), x.ndim)
    return (2 - a) * x + v * score + v.sqrt() * _noise(x, generator)


def _norm(x: Tensor, per: StepSizeNorm) -> Tensor:
    """Per-sample L2 norms (B,), or their batch mean broadcast to (B,) (score_sde's reference code)."""
    norms = x.flatten(1).norm(dim=1)
    return norms if per == "sample" else norms.mean().expand_as(norms)


def langevin_step(denoise: DenoiseFn, process: SDEProcess, x: Tensor, s: float, alpha_i: Tensor, snr: float,
                  generator: torch.Generator | None, step_size_norm: StepSizeNorm = "sample") -> Tensor:
    """One Langevin corrector step at time s (Song et al. 2021, Alg. 4 for VE and Alg. 5 for VP):

    eps_i = 2 alpha_i min((snr ||z|| / ||score||)^2, sigma(s)^2), x <- x + eps_i score + sqrt(2 eps_i) z.

    The min is a floor on ||score|| at snr ||z|| / sigma(s), which Alg. 4-5 lack. A sample whose score is near 0
    (between modes, or at a mode's centre in low dimension) would otherwise get a step far beyond the scale of
    p_s, over 1000 sigma(s)^2 for some samples of a 2-D mixture, and be thrown out of the data's range. The cap
    keeps the corrector's move within the noise level of its time: eps_i <= 2 alpha_i sigma(s)^2. It binds only
    when the predicted noise is small, ||eps_hat|| = sigma ||score|| < snr ||z||. For data near a lower-dimensional
    set (images) ||eps_hat|| ~ ||z||, and a step is about 2 alpha_i snr^2 sigma(s)^2, 1 / snr^2 ~ 40 times below
    the cap. For data spread wider than sigma(s) / snr in every direction (a full-rank Gaussian at small t)
    eps_hat is small, and the cap shortens the steps (Langevin still targets p_s).
    """
    ss = batch_time(s, x)
    score = _score(denoise, process, x, ss)
    z = _noise(x, generator)
    ratio = (snr * _norm(z, step_size_norm) / _norm(score, step_size_norm)) ** 2
    step = append_dims(2 * alpha_i * torch.minimum(ratio, process.sigma(ss) ** 2), x.ndim)
    return x + step * score + (2 * step).sqrt() * z


@torch.no_grad()
def sample_euler_maruyama(denoise: DenoiseFn, process: SDEProcess, x_T: Tensor, *, grid: Tensor,
                          generator: torch.Generator | None = None, progress: bool = False,
                          denoise_final: bool = True, project: ProjectFn | None = None) -> Tensor:
    """Integrate the reverse-time SDE (Song et al. 2021, eq. 6) down a decreasing time grid with Euler–Maruyama.

    Args:
        denoise: (x_t, t) -> Prediction, with t a float tensor of shape (B,).
        process: The SDE the denoiser was trained on.
        x_T: Sample at the grid's first time, e.g. ``process.prior_sample(shape)``.
        grid: Strictly decreasing times, e.g. :func:`~diffusion_pl.samplers.grids.sde_times` (network
            evaluations: one per interval, plus 1 when ``denoise_final``).
        generator: Random generator on x_T's device.
        progress: Show a progress bar.
        denoise_final: Return E[x_0 | x_{t_end}] instead of the noisy x_{t_end} at the grid's last time.
        project: Optional (x, s) -> x applied after every step, s the (B,) time just reached (0 after the
            final denoising).

    Returns:
        The sample, same shape as x_T.
    """
    pairs = grid_pairs(grid, "Euler-Maruyama")
    x = x_T
    for t, s in maybe_progress(pairs, progress, total=len(pairs), desc="Euler-Maruyama"):
        x = euler_maruyama_step(denoise, process, x, t, s, generator)
        x = x if project is None else project(x, batch_time(s, x))
    return finish(denoise, x, pairs[-1][1], denoise_final, project)


def check_pc_options(predictor: str, corrector_steps: int, snr: float, step_size_norm: str) -> None:
    """Raise on options :func:`sample_pc` does not know."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    if corrector_steps < 0 or snr <= 0:
        raise ValueError(f"need corrector_steps >= 0 and snr > 0, got {corrector_steps} and {snr}")
    if step_size_norm not in STEP_SIZE_NORMS:
        raise ValueError(f"unknown step_size_norm {step_size_norm!r}; choose 'sample' or 'batch'")


@torch.no_grad()
def sample_pc(denoise: DenoiseFn, process: SDEProcess, x_T: Tensor, *, grid: Tensor,
              predictor: Predictor = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.16,
              step_size_norm: StepSizeNorm = "sample", generator: torch.Generator | None = None,
              progress: bool = False, denoise_final: bool = True, project: ProjectFn | None = None) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1): at each t_{i+1} -> t_i of the grid one predictor
    step, then ``corrector_steps`` Langevin steps at t_i.

    The Langevin step size is eps_i = 2 alpha_i (snr ||z|| / ||score||)^2 with alpha_i = a_i^2 =
    (alpha(t_i) / alpha(t_{i+1}))^2 of the exact transition: 1 - beta_i for VP (Alg. 5) and 1 for VE
    (Alg. 4); sub-VP gets the same rule as VP (score_sde uses 1 there, an O(beta dt) difference). It is capped
    at 2 alpha_i sigma(t_i)^2 (see :func:`langevin_step`), which keeps low-dimensional data from blowing up.

    Args:
        denoise: (x_t, t) -> Prediction, with t a float tensor of shape (B,).
        process: The SDE the denoiser was trained on.
        x_T: Sample at the grid's first time.
        grid: Strictly decreasing times, e.g. :func:`~diffusion_pl.samplers.grids.sde_times` (network
            evaluations: (1 + corrector_steps) per interval, plus 1 when ``denoise_final``).
        predictor: "reverse_diffusion" (eq. 47) or "euler_maruyama".
        corrector_steps: Langevin steps M per time step (0 disables the corrector).
        snr: The signal-to-noise ratio r of the corrector (0.16 for VE on CIFAR-10 in Song et al.).
        step_size_norm: "sample" takes ||z|| and ||score|| per sample, as in Alg. 4-5 (each sample then
            depends only on its own noise); "batch" uses batch-mean norms, as score_sde's code does.
        generator: Random generator on x_T's device.
        progress: Show a progress bar.
        denoise_final: Return E[x_0 | x_{t_end}] instead of the noisy x_{t_end} at the grid's last time.
        project: Optional (x, s) -> x applied after the predictor and after every corrector step, s the (B,)
            time reached (0 after the final denoising), as in score_sde's inpainting PC sampler.

    Returns:
        The sample, same shape as x_T.
    """
    check_pc_options(predictor, corrector_steps, snr, step_size_norm)
    predict = reverse_diffusion_step if predictor == "reverse_diffusion" else euler_maruyama_step
    pairs = grid_pairs(grid, "predictor-corrector")
    x = x_T
    for t, s in maybe_progress(pairs, progress, total=len(pairs), desc="predictor-corrector"):
        x = predict(denoise, process, x, t, s, generator)
        x = x if project is None else project(x, batch_time(s, x))
        alpha_i = process.transition(batch_time(s, x), batch_time(t, x))[0] ** 2
        for _ in range(corrector_steps):
            x = langevin_step(denoise, process, x, s, alpha_i, snr, generator, step_size_norm)
            x = x if project is None else project(x, batch_time(s, x))
    return finish(denoise, x, pairs[-1][1], denoise_final, project)
