"""ImageSource parts, one dataset each: name one in ``data.init_args.source`` (a class path, or ``class_path`` and
``init_args``); a new dataset is a new subclass of :class:`ImageSource`."""

from diffusion_pl.data.sources.base import DatasetNotFoundError, ImageSource, Split, source_from_text
from diffusion_pl.data.sources.digits import Digits
from diffusion_pl.data.sources.fashion_mnist import FashionMNIST
from diffusion_pl.data.sources.image_folder import ImageFolder
from diffusion_pl.data.sources.streaming import Streaming
from diffusion_pl.data.sources.torchvision_datasets import Torchvision

__all__ = ["DatasetNotFoundError", "Digits", "FashionMNIST", "ImageFolder", "ImageSource", "Split", "Streaming",
           "Torchvision", "source_from_text"]
