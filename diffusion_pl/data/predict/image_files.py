"""The user's own images as predict inputs: a folder of image files or an .npz, read at their own size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_pl.core.errors import UserError
from diffusion_pl.data.format import IMAGE_EXTENSIONS, to_channels
from diffusion_pl.data.images import ImageData
from diffusion_pl.data.predict.base import PredictData, PredictInput
from diffusion_pl.data.predict.split_images import PredictImageDataset

#: Keys of an .npz that hold its images (uint8 N x H x W x C), in the order they are looked for.
NPZ_IMAGE_KEYS = ("images", "samples")


class PredictInputError(UserError, ValueError):
    """The predict images are missing, unreadable or of mixed sizes; the message says which and how to fix it."""


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


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    sizes = sorted({array.shape[:2] for array in arrays})
    if len(sizes) > 1:
        raise PredictInputError(f"the predict images in {where} have different sizes {sizes}: give images of one size")
    return np.stack(arrays)


def _read_folder(folder: Path) -> tuple[np.ndarray, None]:
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS
                   and not path.name.startswith("."))
    if not files:
        raise PredictInputError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError) as error:
            raise PredictInputError(f"cannot decode {path} ({error}): replace it or move it out of {folder}") from error
    return _stack(arrays, str(folder)), None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path) as arrays:
        key = next((key for key in NPZ_IMAGE_KEYS if key in arrays), None)
        if key is None:
            raise PredictInputError(f"{path} has no {' or '.join(NPZ_IMAGE_KEYS)} array (uint8 N x H x W x C); it "
                                    f"has {sorted(arrays)}")
        images = arrays[key]
        labels = arrays["labels"] if "labels" in arrays else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PredictInputError(f"{path}[{key!r}] must be uint8 N x H x W x C with C = 1 or 3, got {images.dtype} "
                                f"{images.shape}")
    return images, labels


def load_predict_images(path: str, channels: int) -> ImageData:
    """The images of a folder (image files in name order) or an .npz (``images`` or ``samples``, uint8 N x H x W x C,
    optional ``labels``) at their own size, converted to ``channels``; label -1 where none is given."""
    source = Path(path).expanduser()
    if not source.exists():
        raise PredictInputError(f"ImageFiles path={path} does not exist: give a folder of images or an .npz")
    images, labels = _read_npz(source) if source.is_file() else _read_folder(source)
    tensor = to_channels(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous(), channels)
    label_tensor = (torch.from_numpy(labels.astype(np.int64)) if labels is not None
                    else torch.full((len(images),), -1, dtype=torch.int64))
    return ImageData(tensor, label_tensor, ())
