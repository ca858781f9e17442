"""Class-label conditioning with label dropout (Ho & Salimans 2022, Alg. 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusion_pl.conditioning.base import Conditioner, NetKwargs, drop_mask


class ClassLabel(Conditioner):
    """``batch["label"]`` -> ``{"y": labels}``; while training each label becomes the null label ``num_classes``
    with probability ``dropout``, so the net also learns p(x) for classifier-free guidance.

    Args:
        num_classes: Number of classes; the net's class embedding needs ``num_classes + 1`` rows (the last is null).
        dropout: Probability of dropping a label while training.
    """

    def __init__(self, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ClassLabel needs num_classes >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"label dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dropout = dropout

    @property
    def null_label(self) -> int:
        """The label index meaning "no class" (the net's extra embedding row)."""
        return self.num_classes

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("label",)

    def check_net(self, net: nn.Module) -> None:
        if getattr(net, "num_classes", None) != self.num_classes:
            raise ValueError(f"ClassLabel(num_classes={self.num_classes}) needs a net with a class embedding of as many "
                             f"classes (+ the null label); the net has num_classes={getattr(net, 'num_classes', None)}: "
                             "set model.init_args.net.init_args.num_classes to the number of classes of the data")

    def forward(self, batch: dict[str, Any], *, training: bool, generator: torch.Generator | None = None) -> NetKwargs:
        if "label" not in batch:
            raise KeyError("a class-conditional model needs batch['label']: give class labels (predict: "
                           "--data.init_args.predict.labels=[...])")
        labels = batch["label"]
        if training and self.dropout > 0:
            drop = drop_mask(labels.shape, self.dropout, labels.device, generator)
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return {"y": labels}

    def null(self, cond: NetKwargs) -> NetKwargs:
        return {"y": torch.full_like(cond["y"], self.null_label)}

    def example_batch(self, num_samples: int, device: torch.device | str,
                      real: Tensor | None = None) -> dict[str, Tensor]:
        """Labels cycling through the classes 0, 1, ..., K - 1, 0, ..."""
        return {"label": torch.arange(num_samples, device=device) % self.num_classes}


class ClassContext(ClassLabel):
    """``batch["label"]`` -> one learned context token per sample, ``{"context": (B, 1, dim)}``, attended to by the
    net's cross-attention blocks (Rombach et al. 2022, Sec. 3.3: tau(y) for class labels is a learned embedding,
    LDM's ClassEmbedder). Row ``num_classes`` of the table is the null token: labels dropped while training (with
    probability ``dropout``) and the unconditional branch of classifier-free guidance use it.

    Args:
        num_classes: Number of classes.
        dim: Width of the token; the net needs ``context_dim`` = ``dim``.
        dropout: Probability of dropping a label while training.
    """

    def __init__(self, num_classes: int, dim: int = 64, dropout: float = 0.1) -> None:
        super().__init__(num_classes, dropout)
        if dim < 1:
            raise ValueError(f"ClassContext needs dim >= 1, got {dim}")
        self.dim = dim
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def check_net(self, net: nn.Module) -> None:
        if getattr(net, "context_dim", None) != self.dim:
            raise ValueError(f"ClassContext(dim={self.dim}) needs a net with cross-attention to tokens of that width; "
                             f"the net has context_dim={getattr(net, 'context_dim', None)}: set "
                             f"model.init_args.net.init_args.context_dim: {self.dim}")
        if getattr(net, "num_classes", None) is not None:
            raise ValueError("ClassContext gives the class through cross-attention, but the net also has a class "
                             "embedding (num_classes): set model.init_args.net.init_args.num_classes: null")

    def forward(self, batch: dict[str, Any], *, training: bool, generator: torch.Generator | None = None) -> NetKwargs:
        return {"context": self.embedding(super().forward(batch, training=training, generator=generator)["y"])[:, None]}

    def null(self, cond: NetKwargs) -> NetKwargs:
        null_label = torch.full((cond["context"].shape[0],), self.null_label, device=cond["context"].device)
        return {"context": self.embedding(null_label)[:, None]}
