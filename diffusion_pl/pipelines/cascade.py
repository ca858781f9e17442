"""Cascaded sampling (Ho et al. 2021, CDM, Sec. 3): a base model samples a low-resolution image and each
super-resolution stage samples the next resolution conditioned on the previous stage's output,
p(x) = p(x_1) prod_k p(x_k | x_{k-1})."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.pipelines.model import GenerativeModel, seeded_noise


def cascade(stages: Sequence[GenerativeModel], seeds: list[int], batch: dict[str, Any] | None = None,
            generator: torch.Generator | None = None) -> list[Tensor]:
    """Every stage's images in [-1, 1], lowest resolution first; the last is the cascade's sample.

    Stage k starts from noise drawn from each item's seed (stream k; stage 0 from the seed itself, so the base
    stage gives the same images as sampling it alone) and sees ``batch`` (e.g. class labels; the items' seeds,
    which fix the low-res augmentation noise) plus ``low_res``, the previous stage's output.

    Args:
        stages: The trained stages, base first; each later one conditioned on a low-res image (``LowResImage``).
        seeds: One seed per image.
        batch: Conditions shared by every stage (e.g. ``{"label": ...}``).
        generator: Randomness of stochastic samplers (with deterministic ones an image depends only on its seed).
    """
    if not stages:
        raise ValueError("a cascade needs at least one stage")
    shared = dict(batch or {})
    shared["seed"] = torch.tensor(seeds)
    outputs: list[Tensor] = []
    for stream, stage in enumerate(stages):
        noise = seeded_noise(stage.process, stage.latent_shape, seeds, stream).to(stage.device)
        stage_batch = {key: value.to(stage.device) if isinstance(value, Tensor) else value
                       for key, value in shared.items()}
        if outputs:
            stage_batch["low_res"] = outputs[-1].to(stage.device)
        outputs.append(stage.sample(noise=noise, batch=stage_batch, generator=generator))
    return outputs
