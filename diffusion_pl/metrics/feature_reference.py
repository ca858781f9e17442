"""The real side of one feature space: the Gaussian moments FID needs and a seeded subset of the features that KID
and precision/recall compare with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_pl.metrics.extractor import FeatureExtractor
from diffusion_pl.metrics.features import extract_features
from diffusion_pl.metrics.frechet import GaussianMoments

#: Real features kept for KID and precision/recall (the FID callback's ``kid_reference_size``).
DEFAULT_KEEP = 10000


@dataclass(frozen=True)
class FeatureReference:
    """Statistics of real images in one extractor's features.

    Attributes:
        moments: Mean and covariance of all the real features (FID).
        features: (M, D) float32 features of a seeded random subset of the images (KID, precision/recall), or None
            where only moments are known (a statistics file of mu and sigma alone).
        extractor: The extractor's name ("" when unknown).
        fingerprint: :meth:`FeatureExtractor.fingerprint` of its weights, or None when unknown.
    """

    moments: GaussianMoments
    features: Tensor | None = None
    extractor: str = ""
    fingerprint: str | None = None

    @classmethod
    def of_features(cls, features: Tensor, keep: int = DEFAULT_KEEP, seed: int = 0, extractor: str = "",
                    fingerprint: str | None = None) -> FeatureReference:
        """Moments of all ``features`` (N, D) and a subset of ``keep`` of them drawn with ``seed``."""
        index = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:keep].sort().values
        return cls(GaussianMoments.of(features), features[index].float(), extractor, fingerprint)

    @classmethod
    def of_images(cls, extractor: FeatureExtractor, images: Tensor, keep: int = DEFAULT_KEEP, seed: int = 0,
                  batch_size: int = 250) -> FeatureReference:
        """The reference of real ``images`` (uint8, or float in [-1, 1]) in ``extractor``'s features."""
        features = extract_features(extractor, images, batch_size).features
        return cls.of_features(features, keep, seed, extractor.name, extractor.fingerprint())
