"""The image format every source delivers: size, channels, how images are fitted, and an optional downsampling.

Each source brings its images to one :class:`ImageFormat` once (at load, or as a file is decoded), so a dataset's
``__getitem__`` only has to index and rescale. The CLI links the format's ``image_size`` and ``channels`` into the
model and its network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from diffusion_pl.core.errors import DataError
from diffusion_pl.core.resize import DOWNSAMPLE_MODES, DownsampleMode, downsample_uint8

log = logging.getLogger(__name__)

ResizeMode = Literal["pad", "resize"]
RESIZE_MODES: tuple[str, ...] = ("pad", "resize")
#: File suffixes read as images (image folders, predict inputs).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
#: PIL modes of single-channel images (no colour is lost converting them to "L").
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_CONVERT_CHUNK = 4096
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" conversion
_WARNED_COLOR_MODES: set[str] = set()


@dataclass(frozen=True)
class ImageFormat:
    """The format of every image a data module serves: uint8 (channels, image_size, image_size).

    Args:
        image_size: Side length every image is converted to once.
        channels: 1 (grayscale) or 3 (RGB).
        resize_mode: ``"pad"`` smaller images with black (Fashion-MNIST 28 -> 32) or ``"resize"`` + center-crop.
        downsample: Fit images to ``image_size * downsample`` first, then reduce them by this factor with
            ``downsample_mode``: the low-resolution data of a cascade's base stage, the same images as the
            ``LowResImage(factor=downsample)`` condition of its super-resolution stage.
        downsample_mode: ``"area"`` (block average) or ``"bilinear"`` (antialiased), as in ``LowResImage``.
    """

    image_size: int = 32
    channels: int = 1
    resize_mode: ResizeMode = "pad"
    downsample: int = 1
    downsample_mode: DownsampleMode = "area"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be 'pad' or 'resize', got {self.resize_mode!r}")
        if self.downsample < 1:
            raise ValueError(f"downsample must be a whole factor >= 1 (1: full resolution), got {self.downsample}")
        if self.downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {', '.join(DOWNSAMPLE_MODES)}, got "
                             f"{self.downsample_mode!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, image_size, image_size) of every image."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def fit_size(self) -> int:
        """The side images are fitted to before they are downsampled."""
        return self.image_size * self.downsample

    def reduce(self, images: Tensor) -> Tensor:
        """uint8 (N, C, fit_size, fit_size) images downsampled to (N, C, image_size, image_size)."""
        return downsample_uint8(images, self.downsample, self.downsample_mode)

    def convert(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) images of any size and 1 or 3 channels in this format (:func:`convert_images`)."""
        return self.reduce(convert_images(images, self.fit_size, self.channels, self.resize_mode))

    def decode(self, file: Path | BinaryIO, name: str | None = None) -> Tensor:
        """One image file (a path or an open binary file) as uint8 (C, H, W) in this format (:func:`decode_image`)."""
        return self.reduce(decode_image(file, self.channels, self.fit_size, self.resize_mode, name)[None])[0]


def warn_color_to_gray(mode: str, example: str = "") -> None:
    """Log, once per process and image mode, that colour images are converted to grayscale (channels: 1)."""
    if mode in _WARNED_COLOR_MODES:
        return
    _WARNED_COLOR_MODES.add(mode)
    log.warning("converting %s images%s to grayscale (ITU-R 601-2 luma), as image_format.channels=1 asks; set "
                "channels: 3 to keep their colour", mode, f" such as {example}" if example else "")


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Convert uint8 (N, C, H, W) images between grayscale and RGB.

    Grayscale -> RGB repeats the channel; RGB -> grayscale uses ITU-R 601-2 luminance (as PIL's ``"L"``).
    """
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        warn_color_to_gray("RGB")
        weights = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        gray = (images.float() * weights).sum(1, keepdim=True)
        return gray.round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert images with {have} channels to {channels}; supported channel counts are 1 and 3")


def fit_size(images: Tensor, image_size: int, resize_mode: ResizeMode = "pad") -> Tensor:
    """Bring uint8 (N, C, H, W) images to (N, C, image_size, image_size).

    Images no larger than ``image_size`` in ``"pad"`` mode are padded symmetrically with black (e.g.
    Fashion-MNIST 28 -> 32 gets a 2-pixel border); otherwise the shorter side is resized (antialiased
    bilinear) to ``image_size`` and the center is cropped.
    """
    height, width = images.shape[-2:]
    if (height, width) == (image_size, image_size):
        return images
    if resize_mode == "pad" and height <= image_size and width <= image_size:
        top, left = (image_size - height) // 2, (image_size - width) // 2
        padding = (left, image_size - width - left, top, image_size - height - top)
        return F.pad(images, padding, value=0)
    images = TF.resize(images, [image_size], antialias=True)
    return TF.center_crop(images, [image_size, image_size]).contiguous()


def convert_images(images: Tensor, image_size: int, channels: int, resize_mode: ResizeMode = "pad") -> Tensor:
    """Apply :func:`to_channels` and :func:`fit_size` in chunks (bounded memory), cheapest order first: uint8
    (N, C, H, W) -> (N, channels, image_size, image_size)."""

    def convert(chunk: Tensor) -> Tensor:
        if chunk.shape[1] > channels:
            return fit_size(to_channels(chunk, channels), image_size, resize_mode)
        return to_channels(fit_size(chunk, image_size, resize_mode), channels)

    if images.shape[0] <= _CONVERT_CHUNK:
        return convert(images).contiguous()
    return torch.cat([convert(chunk) for chunk in images.split(_CONVERT_CHUNK)])


def decode_image(file: Path | BinaryIO, channels: int, image_size: int, resize_mode: ResizeMode,
                 name: str | None = None) -> Tensor:
    """Decode one image (a path or an open binary file) to uint8 (C, image_size, image_size) by :func:`fit_size`; one
    that does not decode raises a DataError naming it (``name``, else the path)."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            if channels == 1 and img.mode not in GRAY_MODES:
                warn_color_to_gray(img.mode, str(name or file))
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # PIL: truncated, unidentified or malformed files
        raise DataError(f"cannot decode image {name or file} ({type(error).__name__}: {error}): the file is damaged "
                        "or not an image; replace it, or move it out of the data folder") from error
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return fit_size(tensor.unsqueeze(0), image_size, resize_mode)[0]
