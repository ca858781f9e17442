"""Learning-rate schedules shared by every module: linear warm-up (Ho et al. 2020 use 5000 steps), then constant or
cosine decay; injected as LightningCLI's ``LRSchedulerCallable``."""

from __future__ import annotations

import math
from typing import Literal

import torch

Decay = Literal["constant", "cosine"]


def warmup_multiplier(step: int, warmup_steps: int, decay: Decay = "constant", total_steps: int | None = None) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): (step + 1) / warmup during warm-up, then 1
    ("constant") or a half-cosine from 1 to 0 at ``total_steps`` ("cosine", Loshchilov & Hutter 2017)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up, then constant or cosine decay to 0 at ``total_steps`` (:func:`warmup_multiplier`).

    Args:
        optimizer: The optimizer (given by the module: ``lr_scheduler`` is a ``LRSchedulerCallable``).
        warmup_steps: Warm-up length in optimizer steps.
        decay: "constant" or "cosine".
        total_steps: Where the cosine reaches 0; None: the trainer's total optimizer steps
            (``estimated_stepping_batches``: ``max_steps``, or the epochs' steps), filled in by the module.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, decay: Decay = "constant",
                 total_steps: int | None = None) -> None:
        if warmup_steps < 0 or decay not in ("constant", "cosine"):
            raise ValueError(f"WarmupLR needs warmup_steps >= 0 and decay 'constant' or 'cosine', got {warmup_steps} "
                             f"and {decay!r}")
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.total_steps = total_steps
        super().__init__(optimizer, self.multiplier)

    def multiplier(self, step: int) -> float:
        return warmup_multiplier(step, self.warmup_steps, self.decay, self.total_steps)
