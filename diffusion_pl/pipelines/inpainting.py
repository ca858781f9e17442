"""Inpainting with any trained model: replacement (Song et al. 2021, App. I), RePaint (Lugmayr et al. 2022) and
x0-replacement (GLIDE's notebook). The output equals the input exactly on the known region."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn, Prediction, eps_from_x0
from diffusion_pl.pipelines.masks import check_mask
from diffusion_pl.pipelines.model import SamplingModel, run_sampler, sampling_process
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.discrete import DiscreteProcess, FixedVariance
from diffusion_pl.samplers import ddpm_step, strided_steps

InpaintMethod = Literal["replace", "repaint", "x0"]
INPAINT_METHODS: tuple[str, ...] = ("replace", "repaint", "x0")


def replacement(known: Tensor, mask: Tensor, process: ForwardProcess, generator: torch.Generator | None):
    """project(x, s): the known region of the sample at time s set to a fresh draw of q(x_s | x_known) (Song et al.
    2021, App. I.2); at s = 0 (alpha 1, sigma 0) it is the known region itself."""

    def project(x: Tensor, s: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mask * process.add_noise(known, s, noise) + (1 - mask) * x

    return project


def x0_replacement(denoise: DenoiseFn, known: Tensor, mask: Tensor, process: ForwardProcess) -> DenoiseFn:
    """The denoiser with its predicted x0 set to the known pixels, x0_hat <- m x_known + (1 - m) x0_hat, and eps made
    consistent (GLIDE's inpainting notebook); any sampler then moves the unknown region towards agreement."""

    def replaced(x_t: Tensor, t: Tensor) -> Prediction:
        pred = denoise(x_t, t)
        x0 = mask * known + (1 - mask) * pred.x0
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process), log_var=pred.log_var)

    return replaced


def repaint_schedule(num_steps: int, jump_length: int, resample: int) -> list[int]:
    """The states k (x_k) RePaint visits from T to 0 (Lugmayr et al. 2022, Sec. 4.2 and their schedule code): one
    step down at a time, and at every ``jump_length``-th step ``resample - 1`` times back up ``jump_length`` steps.
    Consecutive states differ by one: down is a reverse step, up an undo step q(x_{k+1} | x_k)."""
    if jump_length < 1 or resample < 1:
        raise ValueError(f"RePaint needs jump_length >= 1 and resample >= 1, got {jump_length} and {resample}")
    jumps = {j + 1: resample - 1 for j in range(0, num_steps - jump_length, jump_length)}  # their 0-based t = k - 1
    t, times = num_steps, [num_steps]
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    return times


@torch.no_grad()
def repaint(denoise: DenoiseFn, process: DiscreteProcess, known: Tensor, mask: Tensor, x_T: Tensor, *,
            jump_length: int = 10, resample: int = 10, variance: FixedVariance = "beta",
            generator: torch.Generator | None = None) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1): each reverse step combines x_{t-1}^known ~ q(x_{t-1} | x_known) with
    x_{t-1}^unknown ~ p(x_{t-1} | x_t); along :func:`repaint_schedule` the sample is sent back up by the forward
    kernel (:meth:`ForwardProcess.transition`) and denoised again, which harmonises the two regions.

    Returns:
        x_0; its known region is ``known`` exactly.
    """
    states = repaint_schedule(process.num_steps, jump_length, resample)
    x = x_T
    for k_from, k_to in zip(states, states[1:]):
        t = torch.full((x.shape[0],), k_from, device=x.device, dtype=torch.long)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if k_to < k_from:
            unknown = ddpm_step(denoise, process, x, t, variance, generator, add_noise=k_from > 1)
            x = mask * process.add_noise(known, t - 1, noise) + (1 - mask) * unknown
        else:
            a, v = process.transition(t, t + 1)
            x = append_dims(a, x.ndim) * x + append_dims(v.clamp(min=0).sqrt(), x.ndim) * noise
    return x


@torch.no_grad()
def inpaint(model: SamplingModel, images: Tensor, mask: Tensor, *, method: InpaintMethod = "replace",
            batch: dict[str, Any] | None = None, generator: torch.Generator | None = None, steps: int | None = None,
            jump_length: int = 10, resample: int = 10, variance: FixedVariance = "beta") -> Tensor:
    """Fill in the region where ``mask`` is 0.

    Args:
        model: A trained model (``DiffusionModule``).
        images: (B, C, H, W) in [-1, 1]; the known pixels.
        mask: (1 or B, 1, H, W): 1 known, 0 to fill in (see :mod:`diffusion_pl.pipelines.masks`).
        method: "replace" (the known region reset to q(x_s | x_known) after every step of the model's sampler),
            "repaint" (a discrete process; ``steps`` respaced steps, ``jump_length``, ``resample``) or "x0" (the
            known region put into every predicted x0, with the model's sampler).
        batch: Conditions of the B samples (e.g. labels); none for unconditional models.
        generator: Random generator on the model's device.
        steps: RePaint's respaced steps (default: all T).
        jump_length: RePaint's jump length j.
        resample: RePaint's number of resamplings r.
        variance: RePaint's fixed reverse variance when the model learns none.

    Returns:
        (B, C, H, W) in [-1, 1], equal to ``images`` where ``mask`` is 1.
    """
    mask = check_mask(mask, images)
    images = images.to(model.device)
    mask = mask.to(model.device)
    known = model.first_stage.encode(images)
    latent_mask = model.first_stage.latent_mask(mask, tuple(images.shape[1:])).to(known.dtype)
    shape = known.shape
    if method == "replace":
        x_T = model.process.prior_sample(shape, generator=generator, device=model.device)
        process = sampling_process(model)
        out = run_sampler(model, x_T, batch=batch, project=replacement(known, latent_mask, process, generator),
                          generator=generator)
    elif method == "x0":
        x_T = model.process.prior_sample(shape, generator=generator, device=model.device)
        out = run_sampler(model, x_T, batch=batch, generator=generator,
                          wrap=lambda denoise, process: x0_replacement(denoise, known, latent_mask, process))
    elif method == "repaint":
        out = model.first_stage.decode(repaint_latents(model, known, latent_mask, batch, generator, steps,
                                                       jump_length, resample, variance))
    else:
        raise ValueError(f"unknown inpainting method {method!r}; choose one of {', '.join(INPAINT_METHODS)}")
    return mask * images + (1 - mask) * out


def repaint_latents(model: SamplingModel, known: Tensor, mask: Tensor, batch: dict[str, Any] | None,
                    generator: torch.Generator | None, steps: int | None, jump_length: int, resample: int,
                    variance: FixedVariance) -> Tensor:
    """RePaint on the model's discrete process, respaced to ``steps`` when given."""
    if not isinstance(model.process, DiscreteProcess):
        raise ValueError(f"RePaint steps a discrete (DDPM) process, the model's is {type(model.process).__name__}: "
                         "use method='replace' or 'x0', which work with every sampler")
    process = model.process
    if steps is not None and steps != process.num_steps:
        process = process.respace(strided_steps(process.num_steps, steps).tolist())
    x_T = process.prior_sample(known.shape, generator=generator, device=known.device)
    return repaint(model.sampling_denoiser(process, batch or {}), process, known, mask, x_T,
                   jump_length=jump_length, resample=resample, variance=variance, generator=generator)
