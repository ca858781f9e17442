"""scikit-learn's bundled 8x8 digits: a tiny real dataset for quick experiments and tests."""

from __future__ import annotations

import numpy as np

from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import ImageData
from diffusion_pl.data.sources.arrays import image_data
from diffusion_pl.data.sources.base import ImageSource, Split
from diffusion_pl.data.sources.torchvision_datasets import DIGIT_CLASSES

DIGITS_NUM_TEST = 297
DIGITS_SPLIT_SEED = 0


class Digits(ImageSource):
    """scikit-learn's ``load_digits``: 1797 8x8 images, values 0..16 scaled to 0..255, split by a fixed seed into
    1500 train and 297 test images."""

    def class_names(self) -> tuple[str, ...]:
        return DIGIT_CLASSES

    def load(self, split: Split, image_format: ImageFormat) -> ImageData:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("the Digits source needs scikit-learn: `pip install scikit-learn`") from err
        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
        keep = order[-DIGITS_NUM_TEST:] if split == "test" else order[:-DIGITS_NUM_TEST]
        return image_data(images[keep], bunch.target[keep], DIGIT_CLASSES, image_format)
