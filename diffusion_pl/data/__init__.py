"""Data layer: one ImageDataModule for every model family, wired from parts: an :class:`ImageSource` (where the
images come from), an :class:`ImageFormat` (what they look like) and a :class:`PredictInput` (what ``predict`` runs
on); an exactly resumable order. Converting a source for streaming: :mod:`diffusion_pl.data.convert`."""

from diffusion_pl.data.datamodule import ImageDataModule, TrainingImages, calibration_batches
from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import ImageData, Images, LazyImageFolder
from diffusion_pl.data.loading import ImageDataset
from diffusion_pl.data.predict import ImageFiles, PredictInput, SeedDataset, Seeds, SplitImages
from diffusion_pl.data.sampler import ResumableDataLoader, ResumableSampler
from diffusion_pl.data.sources import (
    DatasetNotFoundError,
    Digits,
    FashionMNIST,
    ImageFolder,
    ImageSource,
    Streaming,
    Torchvision,
)

__all__ = [
    "DatasetNotFoundError",
    "Digits",
    "FashionMNIST",
    "ImageData",
    "ImageDataModule",
    "ImageDataset",
    "ImageFiles",
    "ImageFolder",
    "ImageFormat",
    "ImageSource",
    "Images",
    "LazyImageFolder",
    "PredictInput",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeedDataset",
    "Seeds",
    "SplitImages",
    "Streaming",
    "Torchvision",
    "TrainingImages",
    "calibration_batches",
]
