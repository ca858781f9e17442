"""Inpainting masks: 1 marks a known pixel, 0 a pixel to fill in. Masks are (B or 1, 1, H, W) float tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffusion_pl.core.errors import ConfigError, DataError

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

    A box outside 1..size is refused, and so is one that erases the whole image (:func:`check_coverage`).
    """
    if box is not None and not 1 <= box <= size:
        raise ConfigError(f"the box of mask {name!r} must be 1 to {size} pixels (the image side), got {box}")
    mask = torch.ones(1, 1, size, size)
    if name == "left_half":
        mask[..., : size // 2] = 0
    elif name == "center_box":
        side = box or max(1, size // 2)
        start = (size - side) // 2
        mask[..., start:start + side, start:start + side] = 0
    elif name == "random_boxes":
        side = box or max(1, size // 4)
        corners = torch.randint(0, size - side + 1, (count, 2), generator=generator)
        for top, left in corners.tolist():
            mask[..., top:top + side, left:left + side] = 0
    else:
        raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASK_NAMES)}, or give a mask image file")
    check_coverage(mask, f"mask {name!r} of {size}x{size} images" + (f" with box={box}" if box else ""))
    return mask


def load_mask(path: str | Path, size: int) -> Tensor:
    """A (1, 1, size, size) mask from an image file: white (>= 128) marks the region to fill in, as painted in an
    image editor; everything else is known. A file that is missing, does not decode or has another size is a
    :class:`DataError` naming it and the size wanted; one with no white or no dark pixel is refused
    (:func:`check_coverage`)."""
    path = Path(path)
    wanted = f"give an image of {size}x{size} pixels (the data's image_size; white marks the region to fill in)"
    if not path.is_file():
        raise DataError(f"mask image {path} not found: {wanted}")
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"))
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(f"mask image {path} does not decode ({type(error).__name__}: {error}): {wanted}") from error
    if gray.shape != (size, size):
        raise DataError(f"mask image {path} is {gray.shape[1]}x{gray.shape[0]}, the images are {size}x{size}: "
                        "draw the mask at the data's image_size")
    mask = torch.from_numpy(gray < 128).float()[None, None]
    check_coverage(mask, f"mask image {path}")
    return mask


def check_mask(mask: Tensor, images: Tensor) -> Tensor:
    """``mask`` as a 0/1 float (B or 1, 1, H, W) tensor matching ``images`` (B, C, H, W); a clear error otherwise,
    also for a mask with nothing to fill in or nothing known (:func:`check_coverage`)."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != images.shape[-2:] or mask.shape[0] not in (
            1, images.shape[0]):
        raise ValueError(f"an inpainting mask must be (1 or B, 1, H, W) for images of shape {tuple(images.shape)}, "
                         f"got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("an inpainting mask holds 1 (known) and 0 (to fill in) only")
    check_coverage(mask)
    return mask.to(images)


def check_coverage(mask: Tensor, name: str = "the inpainting mask") -> None:
    """Refuse a 0/1 mask (B or 1, 1, H, W) that keeps every pixel of an item (there is nothing to fill in: the output
    would be the input, most likely from an inverted mask) or none (that is plain sampling, not inpainting); the
    message calls it ``name``."""
    known = mask.flatten(1).mean(1)
    if bool((known == 1).any()):
        raise ConfigError(f"{name} keeps every pixel{_items(known == 1)}: there is nothing to fill in. "
                          "Mark the region to fill in (0 in a mask tensor, white in a mask image): is it inverted?")
    if bool((known == 0).any()):
        raise ConfigError(f"{name} keeps no pixel{_items(known == 0)}: that is plain sampling, not "
                          "inpainting. Run predict without the Inpaint task (no model.init_args.predict_task), or "
                          "keep part of the image")


def _items(selected: Tensor) -> str:
    """Which items of a batch of masks are ``selected`` (" of item(s) [i, ...] of the batch"); empty when all are."""
    if bool(selected.all()):
        return ""
    return f" of item(s) {selected.nonzero().flatten().tolist()[:8]} of the batch"
