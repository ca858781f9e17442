"""Grids of real images beside their autoencoder reconstructions (EMA weights), logged to TensorBoard and as PNG."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from diffusion_pl.callbacks.examples import real_examples
from diffusion_pl.callbacks.images import uint8_grid
from diffusion_pl.callbacks.periodic_grid import PeriodicGrid
from diffusion_pl.core.tensors import to_uint8

log = logging.getLogger(__name__)


class ReconstructionGrid(PeriodicGrid):
    """Every ``every_n_steps`` optimizer steps (and when training ends) reconstruct the datamodule's first
    ``num_images`` validation images (``example_images``) and tile them as real | reconstruction pairs.

    The module follows the reconstruction protocol of :class:`~diffusion_pl.models.AutoencoderModule`:
    ``reconstruct(images) -> images``. Runs on global rank 0 only, with the EMA weights (:class:`PeriodicGrid`); the
    grid is TensorBoard image ``reconstructions`` and ``<log_dir>/reconstructions/step_XXXXXXX.png``.

    Args:
        every_n_steps: Interval in optimizer steps (``trainer.global_step``); 0 disables periodic grids.
        num_images: Real images in the grid (each next to its reconstruction).
        save_png: Also write PNG files.
    """

    tag = "reconstructions"
    what = "reconstruction"

    def __init__(self, every_n_steps: int = 1000, num_images: int = 32, save_png: bool = True) -> None:
        super().__init__(every_n_steps, save_png)
        self.num_images = num_images

    def make_grid(self, trainer: pl.Trainer, module: pl.LightningModule) -> Tensor | None:
        images = real_examples(trainer, self.num_images)
        if images is None:
            log.warning("ReconstructionGrid found no validation or test images: attach an ImageDataModule with a "
                        "validation split (data.init_args.val_fraction > 0)")
            return None
        with torch.no_grad():
            reconstructions = module.reconstruct(images.to(module.device)).float().cpu()
        pairs = torch.stack([images.float(), reconstructions], 1).flatten(0, 1)  # real, reconstruction, real, ...
        return uint8_grid(to_uint8(pairs), nrow=2 * math.ceil(math.sqrt(images.shape[0])))
