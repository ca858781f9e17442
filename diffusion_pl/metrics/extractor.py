"""The feature-extractor interface shared by FID, KID and the Inception Score."""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Features:
    """What an extractor returns for a batch of images.

    Attributes:
        features: (B, D) features whose statistics FID and KID compare (Heusel et al. 2017; Binkowski et al. 2018).
        logits: (B, K) class logits for the Inception Score (Salimans et al. 2016), or None when the extractor
            provides none.
    """

    features: Tensor
    logits: Tensor | None = None


class FeatureExtractor(nn.Module, abc.ABC):
    """Maps framework images (float, in [-1, 1], shape (B, C, H, W)) to :class:`Features`.

    An extractor never leaves eval mode (``train()`` is a no-op) and has no trainable parameters, so
    batch-norm statistics and dropout cannot change the features between calls.

    Attributes:
        name: Short identifier, part of the reference-statistics cache key.
        num_features: D, the width of ``Features.features``.
        num_logits: K, the width of ``Features.logits``, or None when the extractor provides no logits.
    """

    name: str
    num_features: int
    num_logits: int | None = None

    @abc.abstractmethod
    def forward(self, images: Tensor) -> Features:
        """Features of ``images`` in [-1, 1]."""

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever ``mode`` says (a Trainer calls ``train()`` on every submodule)."""
        return super().train(False)

    def fingerprint(self) -> str:
        """SHA-256 over the name and every state-dict tensor: identifies the extractor's weights exactly."""
        digest = hashlib.sha256(self.name.encode())
        for key, value in self.state_dict().items():
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
