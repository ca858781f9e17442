"""How often a classifier puts generated images in the class they were generated for (the check of guided and
conditional sampling, e.g. Dhariwal & Nichol 2021's classifier judge)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_pl.core.errors import UserError
from diffusion_pl.metrics.features import model_range


class MissingLabelsError(UserError, ValueError):
    """Samples without target classes, and none given to cycle over them."""


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


def target_labels(labels: Tensor | None, cycled: Sequence[int] | None, num: int, source: str) -> Tensor:
    """The target classes of ``num`` samples: their own ``labels``, else ``cycled`` repeated (as ``predict_labels``).

    Raises:
        MissingLabelsError: Neither is given; ``source`` names the samples in the message.
    """
    if labels is not None:
        return labels
    if not cycled:
        raise MissingLabelsError(f"{source} has no 'labels' array (an unconditional or unguided run): pass --labels "
                                 "with the target classes, comma-separated, cycled over the samples")
    return torch.tensor(list(cycled)).repeat(num // len(cycled) + 1)[:num]
