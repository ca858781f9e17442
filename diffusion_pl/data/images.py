"""A split of images as a source gives it: in memory (:class:`ImageData`) or as files decoded when read
(:class:`LazyImageFolder`), both already in the data module's :class:`~diffusion_pl.data.format.ImageFormat`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from diffusion_pl.data.format import ImageFormat


class Images(Protocol):
    """What a data module needs of a split: its length, labels, class names, and each image and caption."""

    labels: Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def image(self, index: int) -> Tensor:
        """The uint8 (C, H, W) image ``index``."""

    def caption(self, index: int) -> str | None:
        """The caption of image ``index``, or None (a caption is then made from its class name)."""

    def subset(self, index: Tensor) -> Images:
        """The images at ``index`` (int64 positions), in that order."""


@dataclass(frozen=True)
class ImageData:
    """One split held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), already at the target size and channel count.
        labels: int64 tensor (N,).
        class_names: Name of each class; ``labels`` index into it.
        captions: One caption per image (an image folder's caption files), or None: captions from class names.
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, index: int) -> Tensor:
        """The uint8 (C, H, W) image ``index``."""
        return self.images[index]

    def caption(self, index: int) -> str | None:
        """The caption of image ``index``, or None when the split has no caption of its own."""
        return None if self.captions is None else self.captions[index]

    def subset(self, index: Tensor) -> ImageData:
        """The images at ``index`` (int64 positions), in that order."""
        captions = None if self.captions is None else tuple(self.captions[i] for i in index.tolist())
        return ImageData(self.images[index], self.labels[index], self.class_names, captions)


@dataclass(frozen=True)
class LazyImageFolder:
    """An image folder's split as a list of files, each decoded when it is read (in the DataLoader's workers).

    The same images as the in-memory split (same decode, fit and downsampling), without the up-front decode or a copy
    of the split in every process; the in-memory split is faster for small sets.

    Attributes:
        files: The image files, in label order.
        labels: int64 tensor (N,).
        class_names: Name of each class; ``labels`` index into it.
        captions: One caption per image, or None (no caption files).
        image_format: The format each file is decoded to.
    """

    files: tuple[Path, ...]
    labels: Tensor
    class_names: tuple[str, ...]
    captions: tuple[str, ...] | None
    image_format: ImageFormat

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> Tensor:
        """Decode image ``index`` to uint8 (C, H, W) in the split's format."""
        return self.image_format.decode(self.files[index])

    def caption(self, index: int) -> str | None:
        """The caption of image ``index``, or None when the split has no caption files."""
        return None if self.captions is None else self.captions[index]

    def subset(self, index: Tensor) -> LazyImageFolder:
        """The images at ``index`` (int64 positions), in that order."""
        positions = index.tolist()
        captions = None if self.captions is None else tuple(self.captions[i] for i in positions)
        return replace(self, files=tuple(self.files[i] for i in positions), labels=self.labels[index],
                       captions=captions)


def holdout_indices(num_images: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (kept, held-out) positions of a seeded random ``fraction`` of ``num_images``: the validation split,
    the same for the same seed in memory, read lazily or converted for streaming."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    num_held = int(round(fraction * num_images))
    return order[num_held:].sort().values, order[:num_held].sort().values


def split_off(data: Images, fraction: float, seed: int) -> tuple[Images, Images]:
    """(kept, held out): a seeded random ``fraction`` of ``data`` split off; the same seed gives the same split."""
    keep, held = holdout_indices(len(data), fraction, seed)
    return data.subset(keep), data.subset(held)
