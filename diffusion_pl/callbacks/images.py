"""Turning batches of images into grids and files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from diffusion_pl.core.checkpoint_file import write_atomically


def uint8_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """Tile uint8 images (B, C, H, W) into one uint8 (C, H', W') grid with 2-pixel borders."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return make_grid(images, nrow=nrow, padding=2, pad_value=0)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) image as PNG atomically (:func:`~diffusion_pl.core.checkpoint_file.write_atomically`)."""
    array = image.permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    write_atomically(path, [buffer.getbuffer()], what="image")
    return Path(path)


def save_npz(images: Tensor, path: str | Path, **conditions: Tensor | list[str]) -> Path:
    """Write uint8 images as ``samples`` (N, H, W, C) in an .npz, the layout FID tools expect, atomically, with each
    image's conditions beside them (e.g. ``labels``, its target class, (N,); images among them also channel last,
    e.g. N, H, W, C or a trajectory's N, F, H, W, C; text such as ``prompts`` as a string array).

    Raises:
        WriteError: A full disk or read-only folder: nothing partial is left, a previous file stays.
    """
    arrays = {"samples": images.permute(0, 2, 3, 1).cpu().numpy()}
    arrays.update({name: ((value.movedim(-3, -1) if value.ndim >= 4 else value).cpu().numpy()
                          if isinstance(value, Tensor) else np.asarray(value, dtype=str))
                   for name, value in conditions.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, [buffer.getbuffer()], what="predictions")
    return Path(path)
