"""How often a classifier puts generated images in the class they were generated for (the check of guided and
conditional sampling, e.g. Dhariwal & Nichol 2021's classifier judge)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_pl.metrics.features import model_range


@dataclass(frozen=True)
class OnTarget:
    """The share of images the classifier assigns to their target class.

    Attributes:
        share: Over all images.
        per_class: Per target class c: the share among the images aimed at c.
    """

    share: float
    per_class: dict[int, float]


@torch.no_grad()
def predicted_classes(net: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """argmax_c of ``net``'s logits for each image (uint8, or float in [-1, 1]), (N,) on the CPU."""
    device = next(net.parameters()).device
    return torch.cat([net(model_range(batch).to(device)).argmax(-1).cpu() for batch in images.split(batch_size)])


def on_target(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> OnTarget:
    """The share of ``images`` that ``net`` classifies as their ``labels`` (N,), overall and per target class."""
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} target labels")
    correct = (predicted_classes(net, images, batch_size) == labels.cpu()).double()
    return OnTarget(float(correct.mean()), {int(c): float(correct[labels == c].mean()) for c in labels.unique()})
