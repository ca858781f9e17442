"""Conditioner parts: what the network receives besides (x_t, t), built from a batch."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_pl.core.spec import Configurable

NetKwargs = dict[str, Tensor]


class Conditioner(Configurable, nn.Module, abc.ABC):
    """Turns a batch into the network's keyword arguments, and gives the null condition of classifier-free guidance.

    The same conditioner serves training (with condition dropout), validation, sample grids, FID and predict, so a
    model sees its conditions in one form everywhere.
    """

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any], *, training: bool,
                generator: torch.Generator | None = None) -> NetKwargs:
        """The net's keyword arguments for ``batch``; with ``training`` a condition may be dropped (replaced by
        its null value) so that one net also learns the unconditional model (Ho & Salimans 2022, Alg. 1)."""

    def check_net(self, net: nn.Module) -> None:
        """Refuse a network that cannot take this conditioning (raise ValueError saying what to set)."""

    @abc.abstractmethod
    def null(self, cond: NetKwargs) -> NetKwargs:
        """The "no condition" counterpart of ``cond`` (same keys and shapes), for classifier-free guidance."""

    @abc.abstractmethod
    def example_batch(self, num_samples: int, device: torch.device | str,
                      real: Tensor | None = None) -> dict[str, Tensor]:
        """Batch entries that condition ``num_samples`` samples (sample grids, FID): a balanced set of conditions,
        made from ``real`` images of the data (in [-1, 1]) where a condition needs them (e.g. a low-res image)."""

    @property
    @abc.abstractmethod
    def batch_keys(self) -> tuple[str, ...]:
        """The batch entries this conditioner reads (predict writes them next to the samples)."""



def drop_mask(shape: torch.Size, probability: float, device: torch.device,
              generator: torch.Generator | None) -> Tensor:
    """Bernoulli(``probability``) mask of conditions to drop, drawn from ``generator`` (the global RNG when None,
    which the exactly-resumable training run restores)."""
    return torch.rand(shape, device=device, generator=generator) < probability
