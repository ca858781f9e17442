"""The schedule and output of image grids made while training: every N steps and at the end, on rank 0, under the
EMA weights, to TensorBoard and as PNG files."""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from diffusion_pl.callbacks.ema import averaged_module
from diffusion_pl.callbacks.images import save_png

log = logging.getLogger(__name__)


class PeriodicGrid(pl.Callback, abc.ABC):
    """Every ``every_n_steps`` optimizer steps (and when training ends, unless that step has one) :meth:`make_grid`
    runs on global rank 0 with the module in eval mode (its EMA copy when an EMA callback is present). It calls no
    collective, so other DDP ranks are never waited on. The grid goes to every TensorBoard logger as image ``tag``
    and, when ``save_png``, to ``<log_dir>/<tag>/step_XXXXXXX.png``.

    Args:
        every_n_steps: Interval in optimizer steps; 0 disables periodic grids (the final one is kept).
        save_png: Also write PNG files.
    """

    #: The TensorBoard image tag and the PNG folder.
    tag = "grid"
    #: What the grid shows, in the log line.
    what = "image"

    def __init__(self, every_n_steps: int = 1000, save_png: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.save_png = save_png
        self.last_path: Path | None = None
        self._png_dir: Path | None = None
        self._last_step = -1

    @abc.abstractmethod
    def make_grid(self, trainer: pl.Trainer, module: pl.LightningModule) -> Tensor | None:
        """The grid (uint8, C x H x W) of ``module`` (eval mode, no gradients needed), or None to skip."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the PNG folder on every rank: ``trainer.log_dir`` broadcasts, so rank 0 alone must not call it."""
        self._png_dir = Path(trainer.log_dir or trainer.default_root_dir) / self.tag

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step > 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the grid on rank 0 and send it to the loggers and disk (once per step)."""
        if (not trainer.is_global_zero or trainer.sanity_checking or trainer.fast_dev_run
                or trainer.global_step == self._last_step):
            return
        module = averaged_module(trainer, pl_module)
        was_training = module.training
        module.eval()
        try:
            grid = self.make_grid(trainer, module)
        finally:
            module.train(was_training)
        if grid is None:
            return
        self._last_step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, grid, global_step=trainer.global_step)
        if self.save_png:
            png_dir = self._png_dir or Path(trainer.default_root_dir) / self.tag
            self.last_path = save_png(grid, png_dir / f"step_{trainer.global_step:07d}.png")
            log.info("%s grid written to %s", self.what, self.last_path)
