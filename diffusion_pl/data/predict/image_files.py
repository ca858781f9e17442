"""Predict input from the user's files: a folder of images or an .npz."""

from __future__ import annotations

import torch

from diffusion_pl.data.format import to_channels
from diffusion_pl.data.image_files import ImageFileError, read_image_files
from diffusion_pl.data.images import ImageData
from diffusion_pl.data.predict.base import PredictData, PredictInput
from diffusion_pl.data.predict.split_images import PredictImageDataset

#: The error of unusable predict images (missing, unreadable, mixed sizes): the message says how to fix it.
PredictInputError = ImageFileError


class ImageFiles(PredictInput):
    """Images to inpaint, interpolate or super-resolve from the user's files, at their own size, converted to the data
    module's channels.

    Args:
        path: A folder of image files (name order, one size) or an .npz (``images`` or ``samples``, uint8
            N x H x W x C, optional ``labels``).
        indices: Which images, in order (default: all).
        seed: Seed of the first item.
        prompts: Text prompts, cycled (text-guided inpainting).
        batch_size: Batch size of the predict loader (default: the data module's ``batch_size``).
    """

    def __init__(self, path: str, indices: list[int] | None = None, seed: int = 0, prompts: list[str] | None = None,
                 batch_size: int | None = None) -> None:
        super().__init__(seed, prompts, batch_size)
        self.path, self.indices = path, indices

    def dataset(self, data: PredictData) -> PredictImageDataset:
        images = load_predict_images(self.path, data.image_format.channels)
        indices = self.indices or range(len(images))
        return PredictImageDataset(images, indices, self.seed, self.prompts)


def load_predict_images(path: str, channels: int) -> ImageData:
    """The images of a folder (image files in name order) or an .npz (``images`` or ``samples``, uint8 N x H x W x C,
    optional ``labels``) at their own size, converted to ``channels``; label -1 where none is given."""
    files = read_image_files(path, "ImageFiles path")
    labels = files.labels if files.labels is not None else torch.full((len(files.images),), -1, dtype=torch.int64)
    return ImageData(to_channels(files.images, channels), labels, ())
