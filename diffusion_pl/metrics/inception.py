"""The standard FID Inception-v3 (Szegedy et al. 2016; TF weights of Heusel et al. 2017) via torch-fidelity."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from diffusion_pl.core.errors import UserError
from diffusion_pl.core.tensors import to_uint8
from diffusion_pl.metrics.extractor import FeatureExtractor, Features

#: The torch-fidelity feature names: pool3 features (FID, KID) and the 1008 logits without bias (IS).
FEATURE_LAYERS: tuple[str, str] = ("2048", "logits_unbiased")


class InceptionWeightsError(UserError, RuntimeError):
    """The Inception-v3 FID weights could not be loaded; the message says how to provide them."""


def inception_input(images: Tensor) -> Tensor:
    """The one conversion of framework images to Inception input: [-1, 1] float -> uint8 [0, 255], gray -> RGB.

    Args:
        images: (B, 1 or 3, H, W) float images in [-1, 1].

    Returns:
        (B, 3, H, W) uint8, what torchmetrics' and torch-fidelity's FID Inception expect (they resize to 299
        and rescale to [-1, 1] themselves).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Inception features need (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    pixels = to_uint8(images)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def _weights_fix(weights_path: str | None) -> str:
    return (
        "Fixes: run once on a machine with internet access (torch-fidelity caches the file under "
        "$TORCH_HOME/hub/checkpoints), or download "
        f"{URL_INCEPTION_V3} elsewhere and pass its path as `weights_path` (InceptionFeatures) or `--inception-weights` "
        "(diffusion-pl-eval), or use a domain "
        "classifier extractor (diffusion_pl.metrics.ClassifierFeatures, e.g. trained with "
        f"configs/classifier/fashion_mnist.yaml). Given weights_path={weights_path!r}."
    )


def load_inception(weights_path: str | None = None) -> FeatureExtractorInceptionV3:
    """torch-fidelity's FID Inception-v3 returning (pool3 features, unbiased logits), in eval mode.

    Args:
        weights_path: Local weights file (``weights-inception-2015-12-05-6726825d.pth``); None downloads it
            (or reuses torch hub's cached copy).

    Raises:
        InceptionWeightsError: The file is missing or the download failed (offline); the message says what to do.
    """
    if weights_path is not None and not Path(weights_path).is_file():
        raise InceptionWeightsError(
            f"Inception weights file {weights_path} does not exist. " + _weights_fix(weights_path))
    try:
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the global RNG untouched
            return FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURE_LAYERS),
                                               feature_extractor_weights_path=weights_path)
    except OSError as error:  # urllib's URLError/HTTPError and socket errors are OSErrors
        raise InceptionWeightsError(
            f"could not download the FID Inception-v3 weights ({error}). " + _weights_fix(weights_path)) from error


class InceptionFeatures(FeatureExtractor):
    """2048-d pool3 features and 1008 logits of the FID Inception-v3, the extractor of the standard FID/KID/IS.

    The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the one torchmetrics'
    ``FrechetInceptionDistance(feature=2048)`` wraps) with TF-1.x-compatible bilinear resizing to 299x299,
    so the numbers are comparable with the original TF implementation (Heusel et al. 2017).

    Args:
        weights_path: Local weights file; None downloads the weights on first use (cached by torch hub).
    """

    name = "inception-v3-compat"
    num_features = 2048
    num_logits = 1008

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        self.net = load_inception(weights_path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Features:
        """Pool3 features and unbiased logits of ``images`` in [-1, 1]."""
        pool, logits = self.net(inception_input(images))
        return Features(pool, logits)
