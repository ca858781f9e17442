"""Grids of real images beside their autoencoder reconstructions (EMA weights), logged to TensorBoard and as PNG."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from diffusion_pl.callbacks.ema import averaged_module
from diffusion_pl.callbacks.examples import real_examples
from diffusion_pl.callbacks.images import save_png, uint8_grid
from diffusion_pl.utils import to_uint8

log = logging.getLogger(__name__)


class ReconstructionGrid(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and when training ends) reconstruct the datamodule's first
    ``num_images`` validation images (``example_images``) and tile them as real | reconstruction pairs.

    The module follows the reconstruction protocol of :class:`~diffusion_pl.models.AutoencoderModule`:
    ``reconstruct(images) -> images``. Runs on global rank 0 only, with the EMA weights when an EMA callback is
    present. The grid goes to every TensorBoard logger as image ``reconstructions`` and, when ``save_png``, to
    ``<log_dir>/reconstructions/step_XXXXXXX.png``.

    Args:
        every_n_steps: Interval in optimizer steps (``trainer.global_step``); 0 disables periodic grids.
        num_images: Real images in the grid (each next to its reconstruction).
        save_png: Also write PNG files.
    """

    def __init__(self, every_n_steps: int = 1000, num_images: int = 32, save_png: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.save_png = save_png
        self.last_path: Path | None = None
        self._png_dir: Path | None = None
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the PNG folder on every rank: ``trainer.log_dir`` broadcasts, so rank 0 alone must not call it."""
        self._png_dir = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step > 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reconstruct on rank 0 and send the grid to the loggers and disk (once per step)."""
        if (not trainer.is_global_zero or trainer.sanity_checking or trainer.fast_dev_run
                or trainer.global_step == self._last_step):
            return
        images = real_examples(trainer, self.num_images)
        if images is None:
            log.warning("ReconstructionGrid found no validation or test images: attach an ImageDataModule with a "
                        "validation split (data.init_args.val_fraction > 0)")
            return
        module = averaged_module(trainer, pl_module)
        was_training = module.training
        module.eval()
        with torch.no_grad():
            reconstructions = module.reconstruct(images.to(module.device)).float().cpu()
        module.train(was_training)
        pairs = torch.stack([images.float(), reconstructions], 1).flatten(0, 1)  # real, reconstruction, real, ...
        grid = uint8_grid(to_uint8(pairs), nrow=2 * math.ceil(math.sqrt(images.shape[0])))
        self._last_step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("reconstructions", grid, global_step=trainer.global_step)
        if self.save_png:
            png_dir = self._png_dir or Path(trainer.default_root_dir) / "reconstructions"
            self.last_path = save_png(grid, png_dir / f"step_{trainer.global_step:07d}.png")
            log.info("reconstruction grid written to %s", self.last_path)
