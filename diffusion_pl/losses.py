"""Training losses. Each is a small callable in the paper's notation (cf. NVlabs/edm training/loss.py)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from diffusion_pl.parameterization import Denoiser, target_for
from diffusion_pl.utils import mean_except_batch

Weighting = Literal["none", "min_snr"]


class SimpleLoss:
    """L_simple = E_{t, x0, eps} || target - net(x_t, t) ||^2 (Ho et al. 2020, eq. 14 and Alg. 1).

    The target follows the denoiser's parameterization (eps, x0 or v). Returns one loss per sample
    (mean over pixels) so callers can weight, reduce or inspect per-t losses.

    Args:
        weighting: "none" is L_simple. "min_snr" multiplies the x0-space error by min(SNR(t), gamma),
            expressed in the network's own target (Hang et al. 2023, eq. 9).
        min_snr_gamma: gamma of the min-SNR weighting.
    """

    def __init__(self, weighting: Weighting = "none", min_snr_gamma: float = 5.0) -> None:
        if weighting not in ("none", "min_snr"):
            raise ValueError(f"unknown loss weighting {weighting!r}; choose 'none' or 'min_snr'")
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma

    def __call__(self, denoiser: Denoiser, x0: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> Tensor:
        process = denoiser.process
        t = process.sample_t(x0.shape[0], x0.device, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = process.add_noise(x0, t, eps)
        pred = denoiser(x_t, t, **cond)
        target = target_for(denoiser.kind, x0, eps, t, process)
        loss = mean_except_batch((pred.raw.float() - target.float()) ** 2)
        return loss * self.weight(denoiser, t)

    def weight(self, denoiser: Denoiser, t: Tensor) -> Tensor | float:
        """Per-sample weight lambda(t) applied to the squared error in the network's target space."""
        if self.weighting == "none":
            return 1.0
        snr = (denoiser.process.alpha(t) / denoiser.process.sigma(t)) ** 2
        clipped = snr.clamp(max=self.min_snr_gamma)
        if denoiser.kind == "eps":
            return clipped / snr
        if denoiser.kind == "v":
            return clipped / (snr + 1)
        return clipped
