"""What a pipeline needs of a trained model, and how it runs the model's sampler from a given start."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from diffusion_pl.core.seeds import derived_seed
from diffusion_pl.nets.first_stage import FirstStage
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.samplers import OnStepFn, ProjectFn, Sampler

DenoiserWrapper = Callable[[DenoiseFn, ForwardProcess], DenoiseFn]


class SamplingModel(Protocol):
    """A trained diffusion model as pipelines see it (``DiffusionModule`` is one)."""

    process: ForwardProcess
    sampler: Sampler
    first_stage: FirstStage
    device: torch.device

    def sampling_denoiser(self, process: ForwardProcess, batch: dict[str, Any],
                          generator: torch.Generator | None = None) -> DenoiseFn:
        """The conditioned, guided denoiser the sampler calls on ``process``."""


class GenerativeModel(SamplingModel, Protocol):
    """A trained diffusion model that samples whole images (a cascade stage)."""

    latent_shape: tuple[int, int, int]

    def sample(self, num_samples: int | None = None, *, batch: dict[str, Any] | None = None,
               noise: Tensor | None = None, generator: torch.Generator | None = None,
               on_step: OnStepFn | None = None) -> Tensor:
        """Images in [-1, 1] from ``noise``, conditioned and guided by ``batch``; ``on_step`` observes each step."""


def seeded_noise(process: ForwardProcess, shape: tuple[int, ...], seeds: list[int], stream: int = 0) -> Tensor:
    """Prior noise of shape (len(seeds), *shape), item i drawn on the CPU from its own seed (mixed with ``stream``
    for a second draw per seed, e.g. a cascade's later stage), so an image depends only on its seed."""
    return torch.cat([process.prior_sample((1, *shape), generator=torch.Generator().manual_seed(
        seed if stream == 0 else derived_seed(seed, stream))) for seed in seeds])


@torch.no_grad()
def sample_seeds(model: GenerativeModel, num: int, batch_size: int, conditions: dict[str, Any] | None = None,
                 stream: int = 0) -> tuple[Tensor, float]:
    """``num`` images in [-1, 1] from seeds 0 .. num - 1 and the sampling seconds per image.

    Image i starts from the noise of seed i (:func:`seeded_noise`, ``stream`` for a later stage's second draw), sees
    its seed and entry i of each of ``conditions`` (e.g. ``label``, ``prompt``, an SR stage's ``low_res``), so it does
    not depend on the batching; stochastic samplers' step noise comes from one generator seeded with ``stream``.
    """
    images, began = [], time.perf_counter()
    generator = torch.Generator().manual_seed(stream)
    for start in range(0, num, batch_size):
        seeds = list(range(start, min(start + batch_size, num)))
        noise = seeded_noise(model.process, model.latent_shape, seeds, stream)
        batch = {"seed": torch.tensor(seeds),
                 **{key: value[start:start + len(seeds)] for key, value in (conditions or {}).items()}}
        images.append(model.sample(noise=noise, batch=batch, generator=generator).clamp(-1, 1))
    return torch.cat(images), (time.perf_counter() - began) / num


def sampling_process(model: SamplingModel) -> ForwardProcess:
    """The process the model's sampler walks (respaced for ``DDPM(steps=S)``)."""
    return model.sampler.sampling_process(model.process)


def start_grid(grid: Tensor, t: float) -> Tensor:
    """The tail of a decreasing sampler grid from the fraction ``t`` in (0, 1] of its first time on: the entries
    <= t * grid[0] (SDEdit-style start below T; t = 1 is the whole grid)."""
    if not 0.0 < t <= 1.0:
        raise ValueError(f"the start level t must be a fraction of the time range in (0, 1], got {t}")
    tail = grid[grid <= t * float(grid[0]) * (1 + 1e-9)]
    if len(tail) < 2 and grid.is_floating_point():
        raise ValueError(f"t={t} leaves less than one step of the sampler's grid ({len(grid)} times from "
                         f"{float(grid[0]):g}): raise t or the sampler's steps")
    return tail


def start_time(grid: Tensor, like: Tensor) -> Tensor:
    """The grid's first time as a (B,) tensor for ``like`` (integer steps stay long; float times take its dtype)."""
    t = grid[:1].to(like.device)
    t = t.to(like.dtype) if t.is_floating_point() else t
    return t.expand(like.shape[0])


def run_sampler(model: SamplingModel, x_start: Tensor, *, batch: dict[str, Any] | None = None,
                grid: Tensor | None = None, project: ProjectFn | None = None, wrap: DenoiserWrapper | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Decoded images from the model's sampler started at ``x_start`` (latents at the grid's first time), with an
    optional per-step projection and an extra denoiser wrapper (applied after the model's guidance)."""
    process = sampling_process(model)
    denoise = model.sampling_denoiser(process, batch or {}, generator)
    if wrap is not None:
        denoise = wrap(denoise, process)
    latents = model.sampler.sample(denoise, process, x_start, grid=grid, generator=generator, project=project)
    return model.first_stage.decode(latents)
