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

#: Names in the .npz of the batch entries a model is conditioned or guided on (tools read ``labels``).
NPZ_NAMES = {"label": "labels", "prompt": "prompts"}
#: Outputs named ``stage<k>`` (a cascade's stages) also get a grid of their own, ``grid_stage<k>.png``.
STAGE_PREFIX = "stage"


class SampleWriter(BasePredictionWriter):
    """Collect the predictions ``{"samples": uint8 (B, C, H, W), <condition>: (B, ...)}`` and write ``samples.npz``
    (key ``samples``, N x H x W x C, plus each condition, e.g. the target class as ``labels``) and ``grid.png``
    (the samples, or the rows of a ``"panel"`` entry: a predict task's input | masked | result side by side), and
    ``grid_stage<k>.png`` for each ``stage<k>`` entry (a cascade's stages).
    With several processes each rank writes its share as ``samples_rank{r}.npz``.

    Args:
        output_dir: Where to write; defaults to ``<log_dir>/predictions``.
        grid_size: Number of images in the PNG grid (the first ones).
    """

    def __init__(self, output_dir: str | None = None, grid_size: int = 64) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.grid_size = grid_size
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        outputs = [p for p in predictions if isinstance(p, dict)]
        images = torch.cat([p["samples"] for p in outputs])
        conditions = {NPZ_NAMES.get(key, key): _concatenate([p[key] for p in outputs])
                      for key in outputs[0] if key not in ("samples", "panel")}
        if "panel" in outputs[0]:  # one panel per item, e.g. input | masked | result; four panels a row
            grid = uint8_grid(torch.cat([p["panel"] for p in outputs])[: self.grid_size], nrow=4)
        else:
            grid = uint8_grid(images[: self.grid_size])
        root = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        suffix = "" if trainer.world_size == 1 else f"_rank{trainer.global_rank}"
        self.written = [save_npz(images, root / f"samples{suffix}.npz", **conditions),
                        save_png(grid, root / f"grid{suffix}.png")]
        for key in (key for key in outputs[0] if key.startswith(STAGE_PREFIX)):  # a cascade's stages
            stage = torch.cat([p[key] for p in outputs])[: self.grid_size]
            self.written.append(save_png(uint8_grid(stage), root / f"grid_{key}{suffix}.png"))
        log.info("wrote %d samples to %s", images.shape[0], ", ".join(map(str, self.written)))


def _concatenate(parts: list[Any]) -> torch.Tensor | list[str]:
    """The batches' entries of one condition in order: tensors concatenated, lists (e.g. prompts) joined."""
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [item for part in parts for item in part]
