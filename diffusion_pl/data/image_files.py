"""Images a user hands the framework as files: a folder of image files or an .npz as ``diffusion-pl predict`` writes it
(``samples``, uint8 N x H x W x C, with ``labels`` and ``prompts`` beside them). Read by ``predict`` (inputs to
inpaint, interpolate or super-resolve) and by ``diffusion-pl-eval`` (samples to score)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffusion_pl.core.errors import UserError
from diffusion_pl.data.format import GRAY_MODES, IMAGE_EXTENSIONS

#: Keys of an .npz that hold its images (uint8 N x H x W x C), in the order they are looked for.
NPZ_IMAGE_KEYS = ("images", "samples")


class ImageFileError(UserError, ValueError):
    """The image files are missing, unreadable or of mixed sizes; the message says which and how to fix it."""


@dataclass(frozen=True)
class ImageFileSet:
    """The images of a folder or an .npz at their own size and channel count.

    Attributes:
        images: uint8 (N, C, H, W), C = 1 or 3.
        labels: int64 (N,) target classes (the .npz's ``labels``), or None.
        prompts: One prompt per image (the .npz's ``prompts``), or None.
    """

    images: Tensor
    labels: Tensor | None = None
    prompts: tuple[str, ...] | None = None


def _stack(arrays: list[np.ndarray], where: str, what: str) -> np.ndarray:
    sizes = sorted({array.shape[:2] for array in arrays})
    if len(sizes) > 1:
        raise ImageFileError(f"the {what} in {where} have different sizes {sizes}: give images of one size")
    return np.stack(arrays)


def _read_folder(folder: Path, what: str) -> ImageFileSet:
    """Image files in name order; grayscale when every file is, else RGB."""
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS
                   and not path.name.startswith("."))
    if not files:
        raise ImageFileError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    images = []
    try:
        for path in files:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageFileError(f"cannot decode {path} ({error}): replace it or move it out of {folder}") from error
    mode = "L" if all(image.mode in GRAY_MODES for image in images) else "RGB"
    arrays = [np.asarray(image.convert(mode)).reshape(image.height, image.width, -1) for image in images]
    return ImageFileSet(torch.from_numpy(_stack(arrays, str(folder), what)).permute(0, 3, 1, 2).contiguous())


def _read_npz(path: Path) -> ImageFileSet:
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise ImageFileError(f"{path} is not an .npz archive ({error}): give the samples.npz that predict wrote, or "
                             "a folder of images") from error
    with archive as arrays:
        key = next((key for key in NPZ_IMAGE_KEYS if key in arrays), None)
        if key is None:
            raise ImageFileError(f"{path} has no {' or '.join(NPZ_IMAGE_KEYS)} array (uint8 N x H x W x C); it "
                                 f"has {sorted(arrays)}")
        images = arrays[key]
        labels = arrays.get("labels")
        prompts = tuple(str(p) for p in arrays["prompts"].tolist()) if "prompts" in arrays else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ImageFileError(f"{path}[{key!r}] must be uint8 N x H x W x C with C = 1 or 3, got {images.dtype} "
                             f"{images.shape}")
    for name, values in (("labels", labels), ("prompts", prompts)):
        if values is not None and len(values) != len(images):
            raise ImageFileError(f"{path} has {len(images)} images but {len(values)} {name}: give one per image")
    return ImageFileSet(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous(),
                      None if labels is None else torch.from_numpy(labels.astype(np.int64)), prompts)


def read_image_files(path: str | Path, what: str = "images") -> ImageFileSet:
    """The images of a folder (image files in name order) or an .npz (``images`` or ``samples``, uint8
    N x H x W x C, optional ``labels`` and ``prompts``).

    Args:
        path: The folder or .npz.
        what: What the images are, for the errors (e.g. "predict images", "samples").

    Raises:
        ImageFileError: No such path, no images, images of several sizes, or an .npz without a uint8 image array.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise ImageFileError(f"{path} ({what}) does not exist: give a folder of images or an .npz")
    return _read_npz(source) if source.is_file() else _read_folder(source, what)
