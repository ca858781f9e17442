"""Writes the images produced by ``diffusion-pl predict``: a PNG grid and an .npz of uint8 samples."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from diffusion_pl.callbacks.images import save_npz, save_png, uint8_grid

log = logging.getLogger(__name__)


class SampleWriter(BasePredictionWriter):
    """Collect predicted uint8 images and write ``samples.npz`` (key ``samples``, N x H x W x C) and ``grid.png``.

    For a class-conditional or classifier-guided model (``pl_module.guided``) the .npz also holds the target
    class of every image (key ``labels``). With several processes each rank writes its share as
    ``samples_rank{r}.npz``.

    Args:
        output_dir: Where to write; defaults to ``<log_dir>/predictions``.
        grid_size: Number of images in the PNG grid (the first ones).
    """

    def __init__(self, output_dir: str | None = None, grid_size: int = 64) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.output_dir = output_dir
        self.grid_size = grid_size
        self.written: list[Path] = []
        self._labels: list[torch.Tensor] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._labels = []

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Keep the target labels of a guided model's batch (the images arrive at the epoch end)."""
        if getattr(pl_module, "guided", False) and isinstance(batch, dict) and "label" in batch:
            self._labels.append(batch["label"].cpu())

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        images = torch.cat([p for p in predictions if isinstance(p, torch.Tensor)])
        labels = torch.cat(self._labels) if self._labels else None
        root = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        suffix = "" if trainer.world_size == 1 else f"_rank{trainer.global_rank}"
        self.written = [save_npz(images, root / f"samples{suffix}.npz", labels),
                        save_png(uint8_grid(images[: self.grid_size]), root / f"grid{suffix}.png")]
        log.info("wrote %d samples to %s", images.shape[0], ", ".join(map(str, self.written)))
