"""Fixed-seed sample grids of the EMA model, logged to TensorBoard and written as PNG."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from diffusion_pl.callbacks.examples import example_batch
from diffusion_pl.callbacks.images import uint8_grid
from diffusion_pl.callbacks.periodic_grid import PeriodicGrid
from diffusion_pl.core.tensors import to_uint8


class SampleGrid(PeriodicGrid):
    """Every ``every_n_steps`` optimizer steps (and when training ends) sample a grid from the same seed.

    The module follows the sampling protocol of :class:`~diffusion_pl.models.DiffusionModule`: ``example_batch(n)``
    gives balanced conditions (e.g. labels cycling through the classes) and ``sample(n, batch=...)`` the images.
    Sampling runs on global rank 0 only, with the EMA weights (:class:`PeriodicGrid`); the grid is TensorBoard image
    ``samples`` and ``<log_dir>/samples/step_XXXXXXX.png``.

    Args:
        every_n_steps: Interval in optimizer steps; 0 disables periodic grids (the final one is kept).
        num_samples: Images in the grid.
        seed: Seed of the grid's noise (same images across the run, so progress is visible).
        save_png: Also write PNG files.
        nrow: Images per grid row (default: square grid).
    """

    tag = "samples"
    what = "sample"

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 64, seed: int = 0, save_png: bool = True,
                 nrow: int | None = None) -> None:
        super().__init__(every_n_steps, save_png)
        self.num_samples = num_samples
        self.seed = seed
        self.nrow = nrow

    def make_grid(self, trainer: pl.Trainer, module: pl.LightningModule) -> Tensor:
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        batch = example_batch(trainer, module, self.num_samples)
        return uint8_grid(to_uint8(module.sample(self.num_samples, batch=batch, generator=generator)), self.nrow)
