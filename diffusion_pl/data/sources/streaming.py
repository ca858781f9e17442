"""A dataset converted by ``tools/convert_dataset.py``, streamed through LitData: every rank streams its own shard,
and the position in the epoch is saved in checkpoints. LitData is imported when a split is first read."""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import ImageData
from diffusion_pl.data.loading import Batching, ImageDataset
from diffusion_pl.data.sources.base import ImageSource, Split, with_absolute_path
from diffusion_pl.data.streaming.metadata import is_remote, read_metadata

log = logging.getLogger(__name__)


class Streaming(ImageSource):
    """A converted dataset (``train/``, ``val/``, ``test/`` in LitData's chunks), streamed: each image is decoded in
    the loader workers, LitData gives every rank its own shard, and its loader's state (saved in checkpoints) resumes
    mid-epoch. Its validation split was held out at conversion, so the data module's ``val_fraction`` does not apply.

    Args:
        url_or_dir: The converted directory, or its object-store URL (``s3://bucket/name``).
    """

    def __init__(self, url_or_dir: str) -> None:
        self.url_or_dir = url_or_dir

    def class_names(self) -> tuple[str, ...]:
        return read_metadata(self.url_or_dir).class_names

    def load(self, split: Split, image_format: ImageFormat) -> ImageData | None:
        from diffusion_pl.data.streaming.dataset import load_streaming_split

        return load_streaming_split(self.url_or_dir, split, image_format)

    def identity(self) -> dict:
        spec = super().identity()
        return spec if is_remote(self.url_or_dir) else with_absolute_path(spec, "url_or_dir")

    def fit_datasets(self, image_format: ImageFormat, val_fraction: float, seed: int,
                     caption_template: str) -> tuple[Dataset, Dataset]:
        """The streamed train split (shuffled by ``seed`` and the epoch) and the val split held out at conversion."""
        converted = read_metadata(self.url_or_dir).val_fraction
        if not math.isclose(val_fraction, converted):
            log.warning("the validation split of %s was held out at conversion (val_fraction=%g); "
                        "data.init_args.val_fraction=%g does not apply to it", self.url_or_dir, converted,
                        val_fraction)
        train = self._stream("train", image_format, caption_template, shuffle=True, seed=seed)
        val = self._stream("val", image_format, caption_template)
        return train, val if val is not None else _empty(image_format, self.class_names())

    def test_dataset(self, image_format: ImageFormat, caption_template: str) -> Dataset | None:
        return self._stream("test", image_format, caption_template)

    def loader(self, dataset: Dataset, batching: Batching, *, train: bool) -> DataLoader:
        """LitData's loader: each rank streams its shard; its state (the position in the epoch) is checkpointed."""
        from diffusion_pl.data.streaming.dataset import streaming_loader

        return streaming_loader(dataset, batching.batch_size, batching.num_workers, shuffle=train,
                                pin_memory=batching.pin_memory)

    def _stream(self, split: str, image_format: ImageFormat, caption_template: str, shuffle: bool = False,
                seed: int = 0) -> Dataset | None:
        """A split, streamed (None when the dataset has none)."""
        from diffusion_pl.data.streaming.dataset import StreamingImageDataset

        if not read_metadata(self.url_or_dir).splits.get(split):
            return None
        return StreamingImageDataset(self.url_or_dir, split, image_format, caption_template=caption_template,
                                     shuffle=shuffle, seed=seed)


def _empty(image_format: ImageFormat, class_names: tuple[str, ...]) -> ImageDataset:
    """A split without images (a converted dataset without ``val``)."""
    return ImageDataset(ImageData(torch.empty(0, *image_format.shape, dtype=torch.uint8),
                                  torch.empty(0, dtype=torch.long), class_names))
