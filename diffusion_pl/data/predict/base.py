"""PredictInput parts: what ``diffusion-pl predict`` runs on (seeds to sample from, or images to start from)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Protocol

from torch.utils.data import DataLoader, Dataset

from diffusion_pl.core.spec import Configurable
from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import Images
from diffusion_pl.data.sources.base import Split


class PredictData(Protocol):
    """What a predict input reads of its data module: the class names, the image format and whole splits."""

    image_format: ImageFormat

    @property
    def class_names(self) -> list[str]: ...

    def load(self, split: Split) -> Images | None: ...


class PredictInput(Configurable, abc.ABC):
    """The items of the predict loader, each with a ``"seed"`` (the model makes its noise from it) and, with
    ``prompts``, a ``"prompt"`` (cycled): text-conditional or CLIP-guided models target it.

    Args:
        seed: The seed of the first item; item ``i`` has ``seed + i``.
        prompts: Text prompts of the items, cycled.
        batch_size: Batch size of the predict loader (default: the data module's ``batch_size``).
    """

    def __init__(self, seed: int = 0, prompts: Sequence[str] | None = None, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"the predict batch_size must be >= 1, got {batch_size}")
        self.seed, self.prompts, self.batch_size = seed, list(prompts or ()), batch_size

    @abc.abstractmethod
    def dataset(self, data: PredictData) -> Dataset:
        """The predict items, in order."""

    def loader(self, data: PredictData, batch_size: int) -> DataLoader:
        """The items in order, in batches of this input's ``batch_size`` (else ``batch_size``)."""
        return DataLoader(self.dataset(data), batch_size=self.batch_size or batch_size, shuffle=False)
