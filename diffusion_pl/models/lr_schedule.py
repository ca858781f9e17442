"""Learning-rate multipliers: linear warm-up (Ho et al. 2020 use 5000 steps), then constant or cosine decay."""

from __future__ import annotations

import math
from typing import Literal

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
