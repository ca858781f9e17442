"""Several conditioners at once: their keyword arguments are merged."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusion_pl.conditioning.base import Conditioner, NetKwargs


class Compose(Conditioner):
    """Applies each part in order and merges their keyword arguments (which must not overlap).

    Args:
        parts: The conditioners, e.g. a low-res image and a class label.
    """

    def __init__(self, parts: list[Conditioner]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("Compose needs at least one conditioner")
        self.parts = nn.ModuleList(parts)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(key for part in self.parts for key in part.batch_keys))

    def forward(self, batch: dict[str, Any], *, training: bool, generator: torch.Generator | None = None) -> NetKwargs:
        merged: NetKwargs = {}
        for part in self.parts:
            cond = part(batch, training=training, generator=generator)
            overlap = merged.keys() & cond.keys()
            if overlap:
                raise ValueError(f"conditioners of Compose both set the net argument(s) {sorted(overlap)}")
            merged.update(cond)
        return merged

    def check_net(self, net: nn.Module) -> None:
        for part in self.parts:
            part.check_net(net)

    def null(self, cond: NetKwargs) -> NetKwargs:
        merged: NetKwargs = {}
        for part in self.parts:
            merged.update(part.null(cond))
        return merged

    def example_batch(self, num_samples: int, device: torch.device | str,
                      real: Tensor | None = None) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for part in self.parts:
            batch.update(part.example_batch(num_samples, device, real))
        return batch
