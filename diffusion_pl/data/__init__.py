"""Data layer: one ImageDataModule for every model family, dataset sources, and an exactly resumable order."""

from diffusion_pl.data.datamodule import ImageDataModule, ImageDataset, SeedDataset
from diffusion_pl.data.sampler import ResumableDataLoader, ResumableSampler
from diffusion_pl.data.sources import (
    SOURCE_NAMES,
    DatasetNotFoundError,
    ImageData,
    convert_images,
    load_split,
    source_class_names,
)

__all__ = [
    "SOURCE_NAMES",
    "DatasetNotFoundError",
    "ImageData",
    "ImageDataModule",
    "ImageDataset",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeedDataset",
    "convert_images",
    "load_split",
    "source_class_names",
]
