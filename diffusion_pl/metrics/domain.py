"""Domain features: the penultimate layer of a classifier trained by this framework on the data set itself."""

from __future__ import annotations

from torch import Tensor

from diffusion_pl.metrics.extractor import FeatureExtractor, Features
from diffusion_pl.nets.classifier import load_classifier_net


class ClassifierFeatures(FeatureExtractor):
    """Pooled penultimate features of a trained :class:`~diffusion_pl.nets.classifier.EncoderClassifier`.

    Where ImageNet features say little (28x28 grayscale clothes), a clean classifier trained on the data
    set gives the feature space for FID/KID, as Inception does for natural images (the "domain FID" of
    e.g. Heusel et al. 2017's MNIST experiments). It consumes framework images in [-1, 1] directly, the
    range it was trained on. Numbers are comparable only between runs that use the same checkpoint (its
    weights are part of the reference-statistics cache key).

    Args:
        checkpoint_path: A ClassifierModule checkpoint, e.g. from ``configs/classifier/fashion_mnist.yaml``.
    """

    name = "classifier"

    def __init__(self, checkpoint_path: str) -> None:
        super().__init__()
        self.net = load_classifier_net(checkpoint_path)
        self.num_features = self.net.num_features
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Features:
        """Penultimate features of clean ``images`` in [-1, 1]."""
        return Features(self.net.features(images))
