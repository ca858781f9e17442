"""Data layer: one ImageDataModule for every model family, dataset sources, and an exactly resumable order.

Streaming (LitData) lives in :mod:`diffusion_pl.data.streaming`, imported only when a ``streaming`` source is used."""

from diffusion_pl.data.datamodule import ImageDataModule, ImageDataset, SeedDataset, calibration_batches
from diffusion_pl.data.sampler import ResumableDataLoader, ResumableSampler
from diffusion_pl.data.sources import (
    SOURCE_NAMES,
    DatasetNotFoundError,
    ImageData,
    LazyImageFolder,
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
    "LazyImageFolder",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeedDataset",
    "calibration_batches",
    "convert_images",
    "load_split",
    "source_class_names",
]
