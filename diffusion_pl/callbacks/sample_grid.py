"""Fixed-seed sample grids of the EMA model, logged to TensorBoard and written as PNG."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from diffusion_pl.callbacks.ema import averaged_module
from diffusion_pl.callbacks.examples import example_batch
from diffusion_pl.callbacks.images import save_png, uint8_grid
from diffusion_pl.utils import to_uint8

log = logging.getLogger(__name__)


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and when training ends) sample a grid from the same seed.

    The module follows the sampling protocol of :class:`~diffusion_pl.models.DiffusionModule`: ``example_batch(n)``
    gives balanced conditions (e.g. labels cycling through the classes) and ``sample(n, batch=...)`` the images.
    Sampling runs on global rank 0 only and calls no collective, so other DDP ranks are never waited
    on; they simply reach the next gradient all-reduce earlier. The EMA weights are used when an EMA
    callback is present. The grid goes to every TensorBoard logger as image ``samples`` and, when
    ``save_png``, to ``<log_dir>/samples/step_XXXXXXX.png``.

    Args:
        every_n_steps: Interval in optimizer steps; 0 disables periodic grids (the final one is kept).
        num_samples: Images in the grid.
        seed: Seed of the grid's noise (same images across the run, so progress is visible).
        save_png: Also write PNG files.
        nrow: Images per grid row (default: square grid).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 64, seed: int = 0, save_png: bool = True,
                 nrow: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.save_png = save_png
        self.nrow = nrow
        self.last_path: Path | None = None
        self._png_dir: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the PNG folder on every rank: ``trainer.log_dir`` broadcasts, so rank 0 alone must not call it."""
        self._png_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step > 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sample the grid on rank 0 and send it to the loggers and disk."""
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.fast_dev_run:
            return
        module = averaged_module(trainer, pl_module)
        was_training = module.training
        module.eval()
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        batch = example_batch(trainer, module, self.num_samples)
        images = to_uint8(module.sample(self.num_samples, batch=batch, generator=generator))
        module.train(was_training)
        grid = uint8_grid(images, self.nrow)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=trainer.global_step)
        if self.save_png:
            png_dir = self._png_dir or Path(trainer.default_root_dir) / "samples"
            self.last_path = save_png(grid, png_dir / f"step_{trainer.global_step:07d}.png")
            log.info("sample grid written to %s", self.last_path)
