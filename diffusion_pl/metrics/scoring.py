"""Generated images scored against real ones in one feature space: FID, KID, precision/recall and the real-data floor.

The floor is the FID of as many held-out real images as there are samples, against the same reference: what a
generator indistinguishable from the data would score at that N (FID is biased upward at small N; see
:mod:`diffusion_pl.metrics.frechet`). A sample set's FID means little without it on small domain data sets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.core.errors import UserError
from diffusion_pl.metrics.domain import ClassifierFeatures
from diffusion_pl.metrics.extractor import FeatureExtractor
from diffusion_pl.metrics.feature_reference import DEFAULT_KEEP, FeatureReference
from diffusion_pl.metrics.features import extract_features
from diffusion_pl.metrics.frechet import GaussianMoments, frechet_distance
from diffusion_pl.metrics.kernel_distance import kernel_distance
from diffusion_pl.metrics.precision_recall import precision_recall
from diffusion_pl.metrics.real_data import RealData


class ReferenceFeaturesError(UserError, ValueError):
    """A metric needs real features (KID, precision/recall) or held-out images (the floor) the reference lacks."""


class RealReference:
    """One extractor with the reference of real images in its features and, for the floor, held-out real images.

    Args:
        extractor: The feature extractor (in eval mode, on the device it should run on).
        reference: The real statistics in its features.
        held_out: Real images (uint8, or float in [-1, 1]) outside the reference, in the order the floor takes them.
        batch_size: Images per feature batch.
    """

    def __init__(self, extractor: FeatureExtractor, reference: FeatureReference, held_out: Tensor | None = None,
                 batch_size: int = 250) -> None:
        self.extractor = extractor
        self.reference = reference
        self.held_out = held_out
        self.batch_size = batch_size

    @classmethod
    def of_images(cls, extractor: FeatureExtractor, images: Tensor, held_out: Tensor | None = None,
                  keep: int = DEFAULT_KEEP, batch_size: int = 250) -> RealReference:
        """The reference of real ``images``, with ``held_out`` images for the floor."""
        return cls(extractor, FeatureReference.of_images(extractor, images, keep, batch_size=batch_size), held_out,
                   batch_size)

    def features(self, images: Tensor) -> Tensor:
        """The extractor's features of ``images`` (uint8, or float in [-1, 1])."""
        return extract_features(self.extractor, images, self.batch_size).features

    def fid_of_features(self, features: Tensor) -> float:
        """FID of generated ``features`` against the reference."""
        return frechet_distance(self.reference.moments, GaussianMoments.of(features))

    def fid(self, images: Tensor) -> float:
        """FID of ``images`` against the reference."""
        return self.fid_of_features(self.features(images))

    def floor(self, num: int) -> float:
        """FID of the first ``num`` held-out real images: the floor for ``num`` samples."""
        if self.held_out is None or len(self.held_out) < num:
            have = 0 if self.held_out is None else len(self.held_out)
            raise ReferenceFeaturesError(f"the real-data floor of {num} samples needs {num} held-out real images, "
                                         f"there are {have}: give a held-out split with enough images, or fewer "
                                         "samples")
        return self.fid(self.held_out[:num])

    def _real_features(self, metric: str) -> Tensor:
        if self.reference.features is None:
            raise ReferenceFeaturesError(f"{metric} needs real features, but the reference statistics hold only mu "
                                         "and sigma: give the reference as a data source or folder (or a statistics "
                                         "file that diffusion-pl-eval --save-reference wrote)")
        return self.reference.features

    def kid(self, features: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
        """KID mean and std of generated ``features`` against the kept real features (subsets capped by both)."""
        real = self._real_features("KID")
        return kernel_distance(real, features.float(), subsets, min(subset_size, len(real), len(features)), seed)

    def precision_recall(self, features: Tensor, k: int = 3, seed: int = 0) -> tuple[float, float]:
        """Precision and recall of generated ``features``, with equally many real and generated features (the larger
        set subsampled with ``seed``), as Kynkäänniemi et al. 2019 compare them."""
        real = self._real_features("precision/recall")
        num = min(len(real), len(features))
        generator = torch.Generator().manual_seed(seed)
        real = real[torch.randperm(len(real), generator=generator)[:num]]
        fake = features[torch.randperm(len(features), generator=generator)[:num]]
        return precision_recall(real, fake, k)


def domain_reference(extractor: ClassifierFeatures, data: RealData, batch_size: int = 250) -> RealReference:
    """The domain FID set-up: a framework-trained classifier's features, the reference of the ``data`` split at the
    classifier's image size and channels, and the source's other split held out (in order) for the floor.

    Args:
        extractor: The features of a ClassifierModule checkpoint (e.g. from ``configs/classifier/fashion_mnist.yaml``).
        data: The reference split (its image size and channels are replaced by the classifier's).
        batch_size: Images per feature batch.
    """
    data = data.at_size(extractor.net.image_size, extractor.net.in_channels)
    return RealReference.of_images(extractor, data.load().images, data.other_split().load().images,
                                   batch_size=batch_size)
