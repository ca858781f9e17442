"""The per-step projection a sampler applies after each step (inpainting by replacement, Song et al. 2021, App. I)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

ProjectFn = Callable[[Tensor, Tensor], Tensor]
"""(x, t) -> x: maps the sample just computed at the (B,) time t, e.g. resets the known pixels to a noised copy
of the observation at that time."""
