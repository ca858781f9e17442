"""Inpainting masks: 1 marks a known pixel, 0 a pixel to fill in. Masks are (B or 1, 1, H, W) float tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MaskName = Literal["left_half", "center_box", "random_boxes"]
MASK_NAMES: tuple[str, ...] = ("left_half", "center_box", "random_boxes")


def named_mask(name: str, size: int, *, box: int | None = None, count: int = 3,
               generator: torch.Generator | None = None) -> Tensor:
    """A (1, 1, size, size) mask by name.

    Args:
        name: "left_half" (the left half is erased), "center_box" (a centred ``box`` x ``box`` square is erased,
            default size // 2) or "random_boxes" (``count`` squares of side ``box``, default size // 4, at random
            places drawn from ``generator``).
        size: Image side.
        box: Side of the erased square(s).
        count: Number of random boxes.
        generator: Random generator of the random boxes (CPU).
    """
    mask = torch.ones(1, 1, size, size)
    if name == "left_half":
        mask[..., : size // 2] = 0
    elif name == "center_box":
        side = box or size // 2
        start = (size - side) // 2
        mask[..., start:start + side, start:start + side] = 0
    elif name == "random_boxes":
        side = box or max(1, size // 4)
        corners = torch.randint(0, size - side + 1, (count, 2), generator=generator)
        for top, left in corners.tolist():
            mask[..., top:top + side, left:left + side] = 0
    else:
        raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASK_NAMES)}, or give a mask image file")
    return mask


def load_mask(path: str | Path, size: int) -> Tensor:
    """A (1, 1, size, size) mask from an image file: white (>= 128) marks the region to fill in, as painted in an
    image editor; everything else is known."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask image {path} not found")
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"))
    if gray.shape != (size, size):
        raise ValueError(f"mask image {path} is {gray.shape[1]}x{gray.shape[0]}, the images are {size}x{size}: "
                         "draw the mask at the data's image_size")
    return torch.from_numpy(gray < 128).float()[None, None]


def check_mask(mask: Tensor, images: Tensor) -> Tensor:
    """``mask`` as a 0/1 float (B or 1, 1, H, W) tensor matching ``images`` (B, C, H, W); a clear error otherwise."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != images.shape[-2:] or mask.shape[0] not in (
            1, images.shape[0]):
        raise ValueError(f"an inpainting mask must be (1 or B, 1, H, W) for images of shape {tuple(images.shape)}, "
                         f"got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("an inpainting mask holds 1 (known) and 0 (to fill in) only")
    return mask.to(images)
