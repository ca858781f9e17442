"""CascadeModule: a cascade of trained stages for ``diffusion-pl predict`` (Ho et al. 2021, CDM)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from diffusion_pl.conditioning import set_sampling_level
from diffusion_pl.core.errors import ConfigError
from diffusion_pl.core.resize import upsample
from diffusion_pl.core.seeds import predict_seed
from diffusion_pl.core.spec import Configurable
from diffusion_pl.core.tensors import to_uint8
from diffusion_pl.guidance import Guidance
from diffusion_pl.models.diffusion import DiffusionModule
from diffusion_pl.pipelines import cascade, side_by_side
from diffusion_pl.samplers import Sampler


class CascadeStage(Configurable):
    """One stage of a cascade: a trained ``DiffusionModule`` checkpoint and how to sample it.

    Args:
        checkpoint: The stage's checkpoint (its EMA weights, as every checkpoint stores them).
        sampler: The stage's sampler (default: the one it was trained with).
        guidance: The stage's guidance parts, e.g. ``ClassifierFree(scale)`` on the low-res image (default: its own).
        sampling_level: The augmentation level of the low-res input at sampling (default: the stage's own).
    """

    def __init__(self, checkpoint: str, sampler: Sampler | None = None, guidance: list[Guidance] | None = None,
                 sampling_level: float | None = None) -> None:
        self.checkpoint, self.sampler, self.guidance, self.sampling_level = checkpoint, sampler, guidance, sampling_level

    def load(self) -> DiffusionModule:
        """The stage's model in eval mode, with this stage's sampler, guidance and sampling level."""
        overrides: dict[str, Any] = {}
        if self.sampler is not None:
            overrides["sampler"] = self.sampler
        if self.guidance is not None:
            overrides["guidance"] = self.guidance
        model = DiffusionModule.load_from_checkpoint(self.checkpoint, map_location="cpu", **overrides)
        if self.sampling_level is not None:
            set_sampling_level(model, self.sampling_level, f"cascade stage {self.checkpoint}")
        return model.eval()


class CascadeModule(pl.LightningModule):
    """Samples a cascade: the base stage, then each super-resolution stage on the previous one's output
    (:func:`diffusion_pl.pipelines.cascade`). For ``predict`` only: each stage is trained on its own.

    ``predict`` writes the last stage's images as ``samples``, every stage's as ``stage<k>`` (and
    ``grid_stage<k>.png``), and a panel per item with the stages side by side (nearest-neighbour upsampled).

    Args:
        stages: The stages, base first.
        image_size: Side of the final images (linked from the data config; checked against the last stage).
        channels: Image channels (linked from the data config).
    """

    def __init__(self, stages: list[CascadeStage], image_size: int = 32, channels: int = 1) -> None:
        super().__init__()
        if not stages:
            raise ValueError("CascadeModule needs at least one stage: model.init_args.stages=[{checkpoint: ...}, ...]")
        self.save_hyperparameters(ignore=["stages"], logger=False)
        self.stage_configs = list(stages)
        self.stages = nn.ModuleList()

    def setup(self, stage: str) -> None:
        """Load the stages (once). Not in ``__init__``: LightningCLI records the hyperparameters of the module it
        builds, and would hand them to the stages' own ``DiffusionModule`` constructors."""
        if len(self.stages) == 0:
            self.stages.extend(config.load() for config in self.stage_configs)
        self.check_stage_inputs()
        self.check_final_size()

    def check_stage_inputs(self) -> None:
        """Stage 0 samples from noise; every later stage must read the previous stage's images (a conditioner that
        takes ``low_res``, e.g. ``LowResImage``). Otherwise a stage would ignore its input, or need one no stage
        makes, and the cascade would write images that are not a cascade's."""
        for k, (config, stage) in enumerate(zip(self.stage_configs, self.stages)):
            takes_low_res = stage.conditioner is not None and "low_res" in stage.conditioner.batch_keys
            if k > 0 and not takes_low_res:
                raise ConfigError(f"cascade stage {k} ({config.checkpoint}) is not a super-resolution stage (it has no "
                                  f"LowResImage conditioner), so it would ignore stage {k - 1}'s images: give a stage "
                                  "trained with model.init_args.conditioner=LowResImage (configs/cascade/*sr*.yaml)")
            if k == 0 and takes_low_res:
                raise ConfigError(f"cascade stage 0 ({config.checkpoint}) is a super-resolution stage: it needs a "
                                  "low-res image that no earlier stage makes. Put a base model first (to upsample "
                                  "images you have, use predict_task SuperResolve on that stage alone)")

    def check_final_size(self) -> None:
        """The last stage must make the images of the data config."""
        channels, image_size = self.hparams.channels, self.hparams.image_size
        last = self.stages[-1].hparams
        if (last.channels, last.image_size) != (channels, image_size):
            raise ValueError(f"the last cascade stage makes {last.channels}x{last.image_size}x{last.image_size} images "
                             f"but the data config says {channels}x{image_size}x{image_size}: set data.init_args."
                             "image_size and channels to the final stage's")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        seeds = batch["seed"].tolist()
        generator = torch.Generator(device=self.device).manual_seed(predict_seed(int(seeds[0])))
        conditions = {key: value for key, value in batch.items() if key != "seed"}
        outputs = [to_uint8(images).cpu() for images in cascade(list(self.stages), seeds, conditions, generator)]
        size = outputs[-1].shape[-1]
        panel = side_by_side(*(upsample_uint8(images, size) for images in outputs))
        return {"samples": outputs[-1], "panel": panel, **{f"stage{k}": images for k, images in enumerate(outputs)},
                **{key: value.cpu() for key, value in conditions.items()}}


def upsample_uint8(images: Tensor, size: int) -> Tensor:
    """Nearest-neighbour upsampling of uint8 images (each low-res pixel becomes a block)."""
    return upsample(images.float(), size, "nearest").to(torch.uint8)
