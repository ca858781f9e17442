"""ImageSource parts: where a data module's images come from."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Literal

import yaml
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.core.errors import UserError
from diffusion_pl.core.spec import Configurable, build, is_spec, spec_of
from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import Images, split_off
from diffusion_pl.data.loading import Batching, ImageDataset, eval_loader, train_loader

Split = Literal["train", "test"]


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are absent locally and could not be downloaded; the message says how to fix it."""


class ImageSource(Configurable, abc.ABC):
    """A dataset: its class names, and each of its splits in a given image format.

    A new dataset is one subclass with :meth:`class_names` and :meth:`load`, named in YAML
    (``data.init_args.source: {class_path: mylab.data.MySource, init_args: {...}}``). The data module holds out the
    validation split, batches, shards and flips; a source that batches itself (a streamed one) also overrides
    :meth:`fit_datasets`, :meth:`test_dataset` and :meth:`loader`.
    """

    def __init__(self) -> None:
        """A source without arguments; one with arguments defines its own ``__init__`` (its spec records them)."""

    @abc.abstractmethod
    def class_names(self) -> tuple[str, ...]:
        """Names of the classes in label order, known without loading images."""

    @abc.abstractmethod
    def load(self, split: Split, image_format: ImageFormat) -> Images | None:
        """The whole ``split`` in ``image_format`` (in memory, or files decoded when read); None when the dataset
        has no such split (then the data module tests on its validation split)."""

    def prepare(self) -> None:
        """Download what the source needs (called once, on one process, before any :meth:`load`)."""

    def identity(self) -> dict[str, Any]:
        """What the images depend on besides the format (the key of cached statistics): the part's spec."""
        return spec_of(self)

    def fit_datasets(self, image_format: ImageFormat, val_fraction: float, seed: int,
                     caption_template: str) -> tuple[Dataset, Dataset]:
        """(train, validation): a seeded random ``val_fraction`` of the train split held out."""
        data = self.load("train", image_format)
        if data is None:
            raise ValueError(f"{type(self).__name__} has no train split to fit on")
        train, val = split_off(data, val_fraction, seed)
        return ImageDataset(train, caption_template), ImageDataset(val, caption_template)

    def test_dataset(self, image_format: ImageFormat, caption_template: str) -> Dataset | None:
        """The test split, or None when the dataset has none."""
        data = self.load("test", image_format)
        return None if data is None else ImageDataset(data, caption_template)

    def loader(self, dataset: Dataset, batching: Batching, *, train: bool) -> DataLoader:
        """The loader of one of this source's datasets: for training (``train``) shuffled, sharded by rank and
        exactly resumable, else in order."""
        return train_loader(dataset, batching) if train else eval_loader(dataset, batching)


def with_absolute_path(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """``spec`` with its init arg ``name`` (a local path, or None) made absolute: two spellings of one folder
    identify the same images."""
    value = spec["init_args"].get(name)
    absolute = None if value is None else str(Path(value).expanduser().resolve())
    return {**spec, "init_args": {**spec["init_args"], name: absolute}}


def source_from_text(text: str) -> ImageSource:
    """A source part from a tool's command line: a class path (``diffusion_pl.data.FashionMNIST``) or a YAML spec
    (``{class_path: diffusion_pl.data.ImageFolder, init_args: {root: photos/}}``)."""
    value = yaml.safe_load(text)
    part = build(value if is_spec(value) else {"class_path": text}, "the source argument")
    if not isinstance(part, ImageSource):
        raise ValueError(f"{text!r} is not an ImageSource part; name one such as diffusion_pl.data.FashionMNIST")
    return part
