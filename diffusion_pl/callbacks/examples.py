"""The conditions that sample grids and FID generate under."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from diffusion_pl.data import ImageDataModule


def real_examples(trainer: pl.Trainer, num_images: int) -> Tensor | None:
    """The first ``num_images`` validation (else test) images of the trainer's ImageDataModule, for conditions made
    from data (a super-resolution stage's low-res inputs); None without one."""
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.example_images(num_images) if isinstance(datamodule, ImageDataModule) else None


def example_batch(trainer: pl.Trainer, module: pl.LightningModule, num_samples: int) -> dict[str, Any]:
    """The module's balanced conditions for ``num_samples`` samples, given the data's example images."""
    return module.example_batch(num_samples, real=real_examples(trainer, num_samples))
