"""Real images to compare samples with: one split of a data source part at the samples' format."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from diffusion_pl.core.errors import UserError
from diffusion_pl.core.spec import build
from diffusion_pl.data import ImageData, ImageFormat, ImageSource
from diffusion_pl.data.sources.base import Split, source_from_text

#: The split names a reference argument may end with (``diffusion_pl.data.FashionMNIST:train``).
SPLITS: tuple[Split, ...] = ("train", "test")


class MissingSplitError(UserError, ValueError):
    """A data source without the split a reference or floor needs."""


@dataclass(frozen=True)
class RealData:
    """One split of a data source, in the format the training data had (:meth:`ImageSource.load`).

    Attributes:
        source: The source part (``FashionMNIST()``, ``ImageFolder(root)``, ...).
        split: ``"train"`` or ``"test"``.
        image_format: Size, channels and fitting of the images.
    """

    source: ImageSource
    split: Split = "test"
    image_format: ImageFormat = field(default_factory=ImageFormat)

    def load(self) -> ImageData:
        """The images (uint8, in memory) and labels of the split."""
        data = self.source.load(self.split, self.image_format)
        if data is None:
            raise MissingSplitError(f"{type(self.source).__name__} has no {self.split!r} split (an image folder "
                                    "without train/ and test/ subfolders): use its 'train' split, or give the "
                                    "held-out images separately")
        if isinstance(data, ImageData):
            return data
        images = torch.stack([data.image(i) for i in range(len(data))])  # a split decoded lazily: read it whole
        return ImageData(images, data.labels, data.class_names)

    def at_size(self, image_size: int, channels: int) -> RealData:
        """The same split brought to ``channels`` x ``image_size`` x ``image_size``."""
        return replace(self, image_format=replace(self.image_format, image_size=image_size, channels=channels))

    def other_split(self) -> RealData:
        """The same source's other split: held-out images for the real-data floor."""
        return replace(self, split="train" if self.split == "test" else "test")

    def describe(self) -> dict[str, Any]:
        """The source's identity, the split and the format, for reports and statistics files (:meth:`from_description`
        reads it back)."""
        return {"source": self.source.identity(), "split": self.split, "image_format": asdict(self.image_format)}

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> RealData:
        """The real data a :meth:`describe` dict names (its source built from the allow-list of parts)."""
        return cls(build(described["source"], "the statistics file's source"), described["split"],
                   ImageFormat(**described["image_format"]))

    @classmethod
    def from_text(cls, text: str, image_format: ImageFormat) -> RealData:
        """``SOURCE[:SPLIT]``: a source part as a class path (``diffusion_pl.data.FashionMNIST``; a bare name is
        looked up in ``diffusion_pl.data``) or a YAML spec, and the split (default test)."""
        head, _, tail = text.rpartition(":")
        name, split = (head, tail) if head and tail in SPLITS else (text, "test")
        if "." not in name and not name.lstrip().startswith("{"):
            name = f"diffusion_pl.data.{name}"
        return cls(source_from_text(name), split, image_format)  # type: ignore[arg-type]
