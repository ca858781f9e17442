"""Turning batches of images into grids and files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def uint8_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """Tile uint8 images (B, C, H, W) into one uint8 (C, H', W') grid with 2-pixel borders."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return make_grid(images, nrow=nrow, padding=2, pad_value=0)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) image as PNG atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    tmp = path.with_name(path.name + ".tmp")
    pil.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_npz(images: Tensor, path: str | Path, **conditions: Tensor | list[str]) -> Path:
    """Write uint8 images as ``samples`` (N, H, W, C) in an .npz, the layout FID tools expect, atomically, with each
    image's conditions beside them (e.g. ``labels``, its target class, (N,); images among them also as N, H, W, C;
    text such as ``prompts`` as a string array)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {"samples": images.permute(0, 2, 3, 1).cpu().numpy()}
    arrays.update({name: ((value.permute(0, 2, 3, 1) if value.ndim == 4 else value).cpu().numpy()
                          if isinstance(value, Tensor) else np.asarray(value, dtype=str))
                   for name, value in conditions.items()})
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path
