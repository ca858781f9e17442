"""Helpers of the sources that load a whole split as arrays (Fashion-MNIST, torchvision's datasets, digits)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import ImageData


def default_cache_dir() -> Path:
    """Download folder when no ``root`` is given: ``$DIFFUSION_PL_DATA`` or ``~/.cache/diffusion_pl/datasets``."""
    if env := os.environ.get("DIFFUSION_PL_DATA"):
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "diffusion_pl" / "datasets"


def to_nchw(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images as (N, C, H, W): (N, H, W) gains a channel; (N, H, W, C) with C in {1, 3} is permuted."""
    tensor = torch.as_tensor(np.asarray(images, dtype=np.uint8))
    if tensor.ndim == 3:
        return tensor.unsqueeze(1).contiguous()
    if tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        return tensor.permute(0, 3, 1, 2).contiguous()
    return tensor.contiguous()


def image_data(images: np.ndarray | Tensor, labels: np.ndarray | Tensor, class_names: tuple[str, ...],
               image_format: ImageFormat) -> ImageData:
    """A split of uint8 image and label arrays, converted once to ``image_format``."""
    return ImageData(image_format.convert(to_nchw(images)), torch.as_tensor(np.asarray(labels), dtype=torch.int64),
                     class_names)
