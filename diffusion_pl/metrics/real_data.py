"""Real images to compare samples with: one split of a data source at the samples' format."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from diffusion_pl.core.errors import UserError
from diffusion_pl.data.sources import ImageData, load_split


class MissingSplitError(UserError, ValueError):
    """A data source without the split a reference or floor needs."""


@dataclass(frozen=True)
class RealData:
    """One split of a data source, converted like the training data (see :func:`~diffusion_pl.data.load_split`).

    Attributes:
        source: A data source name (``fashion_mnist``, ``image_folder``, ...).
        split: ``"train"`` or ``"test"``.
        root: The source's folder (``image_folder``, ``streaming``), or None.
        image_size: Side length the images are brought to.
        channels: 1 or 3.
        resize_mode: ``"pad"`` or ``"resize"``.
    """

    source: str
    split: str = "test"
    root: str | None = None
    image_size: int = 32
    channels: int = 1
    resize_mode: str = "pad"

    def load(self) -> ImageData:
        """The images (uint8) and labels of the split."""
        data = load_split(self.source, self.split, root=self.root, image_size=self.image_size,  # type: ignore[arg-type]
                          channels=self.channels, resize_mode=self.resize_mode)  # type: ignore[arg-type]
        if data is None:
            raise MissingSplitError(f"{self.source} at {self.root} has no {self.split!r} split (an image folder "
                                    "without train/ and test/ subfolders): use its 'train' split, or give the "
                                    "held-out images separately")
        return data

    def other_split(self) -> RealData:
        """The same source's other split: held-out images for the real-data floor."""
        return replace(self, split="train" if self.split == "test" else "test")

    def describe(self) -> dict[str, Any]:
        """Its fields, for reports and statistics files."""
        return dict(vars(self))
