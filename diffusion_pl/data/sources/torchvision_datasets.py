"""Datasets of ``torchvision.datasets`` that take ``train=True/False`` (MNIST, CIFAR-10, CIFAR-100, KMNIST, ...)."""

from __future__ import annotations

from typing import Any

from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import ImageData
from diffusion_pl.data.sources.arrays import default_cache_dir, image_data
from diffusion_pl.data.sources.base import DatasetNotFoundError, ImageSource, Split, with_absolute_path

DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
#: Class names known without loading the data (the rest come from the dataset's ``classes`` once it is loaded).
KNOWN_CLASSES: dict[str, tuple[str, ...]] = {"MNIST": DIGIT_CLASSES, "CIFAR10": CIFAR10_CLASSES}


class Torchvision(ImageSource):
    """A dataset of ``torchvision.datasets`` whose class takes ``train=`` and holds ``data`` (uint8 N x H x W or
    N x H x W x C) and ``targets``: ``MNIST``, ``CIFAR10``, ``CIFAR100``, ``KMNIST``, ``EMNIST`` ...

    Args:
        name: The class name in ``torchvision.datasets``, e.g. ``CIFAR10``.
        root: Where torchvision keeps its files (default ``$DIFFUSION_PL_DATA`` or ``~/.cache/diffusion_pl/datasets``).
        download: Allow downloading the data when no local copy exists.
    """

    def __init__(self, name: str, root: str | None = None, download: bool = True) -> None:
        from torchvision import datasets

        dataset_class = getattr(datasets, name, None)
        if not isinstance(dataset_class, type):
            raise ValueError(f"torchvision.datasets has no dataset {name!r}; name its class, e.g. MNIST or CIFAR10")
        self.name, self.root, self.download = name, root, download
        self._dataset_class = dataset_class

    def class_names(self) -> tuple[str, ...]:
        if self.name in KNOWN_CLASSES:
            return KNOWN_CLASSES[self.name]
        return tuple(self._dataset("train").classes)

    def load(self, split: Split, image_format: ImageFormat) -> ImageData:
        dataset = self._dataset(split)
        return image_data(dataset.data, dataset.targets, self.class_names(), image_format)

    def prepare(self) -> None:
        for split in ("train", "test"):
            self._dataset(split)

    def identity(self) -> dict:
        return with_absolute_path(super().identity(), "root")

    def _dataset(self, split: Split) -> Any:
        target = self.root or str(default_cache_dir())
        try:
            return self._dataset_class(target, train=split == "train", download=self.download)
        except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError offline, URLError on network errors
            how = "download was disabled (download=False)" if not self.download else f"the download failed ({err})"
            raise DatasetNotFoundError(
                f"{self.name} not found under {target!r} and {how}. Fix: pass `--data.init_args.source.root=` a "
                f"folder where torchvision's files already are (it looks in <root>/{self.name} or the folder "
                "torchvision names), or allow the download (`--data.init_args.source.download=true`) on a machine "
                "with internet."
            ) from err
