"""Watch samples form: a predict task that records each seed's data estimates (or states) along the sampler's
steps through the samplers' observe-only ``on_step`` hook."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from diffusion_pl.core.tensors import to_uint8
from diffusion_pl.pipelines.model import GenerativeModel, seeded_noise
from diffusion_pl.pipelines.tasks import PredictTask, side_by_side

Shown = Literal["x0", "x"]


class StepKeeper:
    """Keeps about ``2 * frames`` evenly spaced steps of a run of unknown length: every ``stride``-th step, the
    stride doubling (and every other kept step dropped) whenever more would be kept; the last step is kept too."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.stride = 1
        self.kept: dict[int, Tensor] = {}
        self.last: Tensor | None = None

    def __call__(self, step: int, value: Tensor) -> None:
        self.last = value
        if step % self.stride:
            return
        self.kept[step] = value
        if len(self.kept) > 2 * self.frames:
            self.stride *= 2
            self.kept = {i: v for i, v in self.kept.items() if i % self.stride == 0}

    def evenly(self) -> list[Tensor]:
        """``frames`` of the kept steps, evenly spaced from the first step to the last one."""
        values = [*self.kept.values(), *([] if self.last is None else [self.last])]
        picks = torch.linspace(0, len(values) - 1, self.frames).round().long().tolist()
        return [values[index] for index in picks]


class Trajectory(PredictTask):
    """Sample one image per seed (as plain ``predict``) and show how it forms: each row of grid.png is a seed's data
    estimate x0_hat (or its state x_t) at ``frames`` evenly spaced steps of the sampler, then the sample; samples.npz
    holds the samples and, under ``trajectory``, the frames (N, frames, C, H, W). Latent models show decoded frames.

    Args:
        frames: Steps shown per row, from the first step to the last.
        show: "x0", the denoiser's data estimate at each step's start (Ho et al. 2020, Fig. 6), or "x", the sample.
    """

    def __init__(self, frames: int = 8, show: Shown = "x0") -> None:
        if frames < 2 or show not in ("x0", "x"):
            raise ValueError(f"Trajectory needs frames >= 2 and show 'x0' or 'x', got frames={frames}, show={show!r}")
        self.frames, self.show = frames, show

    def __call__(self, model: GenerativeModel, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        seeds = batch["seed"].tolist()
        noise = seeded_noise(model.process, model.latent_shape, seeds).to(model.device)
        keeper = StepKeeper(self.frames)
        out = model.sample(noise=noise, batch=batch, generator=generator,
                           on_step=lambda i, t, x, x0: keeper(i, x0 if self.show == "x0" else x))
        frames = [to_uint8(model.first_stage.decode(value)).cpu() for value in keeper.evenly()]
        samples = to_uint8(out).cpu()
        conditions = {key: batch[key].cpu() for key in ("label",) if key in batch}
        return {"samples": samples, "panel": side_by_side(*frames, samples), "trajectory": torch.stack(frames, 1),
                **conditions}
