"""Features of a whole image set, extracted in batches on the extractor's device and gathered on the CPU."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.core.tensors import from_uint8
from diffusion_pl.metrics.extractor import FeatureExtractor, Features


def model_range(images: Tensor) -> Tensor:
    """Framework images: uint8 [0, 255] mapped to float in [-1, 1]; float images (already in [-1, 1]) as they are."""
    return from_uint8(images) if images.dtype == torch.uint8 else images


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 250) -> Features:
    """The features (and logits, where the extractor gives them) of ``images`` (N, C, H, W): uint8, or float in
    [-1, 1]; batches go to the device of the extractor's parameters."""
    device = next(extractor.parameters()).device
    features: list[Tensor] = []
    logits: list[Tensor] = []
    for batch in images.split(batch_size):
        out = extractor(model_range(batch).to(device))
        features.append(out.features.cpu())
        if out.logits is not None:
            logits.append(out.logits.cpu())
    return Features(torch.cat(features), torch.cat(logits) if logits else None)
