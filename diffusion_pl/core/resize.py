"""Changing an image's resolution: the low-res input of a super-resolution stage, and its upsampling back.

One definition serves the data (a cascade's base stage trains on ``downsample``d images), the ``LowResImage``
conditioner, the cascade pipeline and the super-resolution metrics, so they all agree on what "the 16x16 version
of a 32x32 image" is.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DownsampleMode = Literal["area", "bilinear"]
UpsampleMode = Literal["nearest", "bilinear", "bicubic"]
DOWNSAMPLE_MODES: tuple[str, ...] = ("area", "bilinear")
UPSAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear", "bicubic")


def check_factor(factor: int, size: int) -> None:
    """Raise ValueError unless ``factor`` >= 1 divides ``size``."""
    if factor < 1 or size % factor:
        raise ValueError(f"the resolution factor must be a whole number >= 1 that divides the image size {size}, "
                         f"got {factor}")


def downsample(images: Tensor, factor: int, mode: DownsampleMode = "area") -> Tensor:
    """(B, C, H, W) float images -> (B, C, H / factor, W / factor).

    ``"area"`` averages each factor x factor block (exact box filter); ``"bilinear"`` is antialiased bilinear.
    """
    check_factor(factor, images.shape[-1])
    if factor == 1:
        return images
    if mode == "area":
        return F.avg_pool2d(images, factor)
    if mode == "bilinear":
        size = (images.shape[-2] // factor, images.shape[-1] // factor)
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    raise ValueError(f"unknown downsampling mode {mode!r}; choose one of {', '.join(DOWNSAMPLE_MODES)}")


def upsample(images: Tensor, size: int, mode: UpsampleMode = "bilinear") -> Tensor:
    """(B, C, h, w) float images -> (B, C, size, size) (``align_corners=False``)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsampling mode {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")
    options = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(images, size=(size, size), mode=mode, **options)


def downsample_uint8(images: Tensor, factor: int, mode: DownsampleMode = "area") -> Tensor:
    """:func:`downsample` for uint8 (N, C, H, W) images, rounded back to uint8 (the data's storage)."""
    if factor == 1:
        return images
    chunks = [downsample(chunk.float(), factor, mode).round_().clamp_(0, 255).to(torch.uint8)
              for chunk in images.split(4096)]
    return torch.cat(chunks)
