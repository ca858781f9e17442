"""Images that ``diffusion-pl predict`` reads from the user's files: inputs to inpaint, interpolate or super-resolve."""

from __future__ import annotations

import torch

from diffusion_pl.data.image_files import ImageFileError, read_image_files
from diffusion_pl.data.sources import ImageData, to_channels

#: The error of unusable predict images (missing, unreadable, mixed sizes): the message says how to fix it.
PredictInputError = ImageFileError


def load_predict_images(path: str, channels: int) -> ImageData:
    """The images of a folder (image files in name order) or an .npz (``images`` or ``samples``, uint8 N x H x W x C,
    optional ``labels``) at their own size, converted to ``channels``; label -1 where none is given."""
    files = read_image_files(path, "predict_images")
    labels = files.labels if files.labels is not None else torch.full((len(files.images),), -1, dtype=torch.int64)
    return ImageData(to_channels(files.images, channels), labels, ())
