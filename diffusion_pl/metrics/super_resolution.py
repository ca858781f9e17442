"""How faithful a super-resolved image is: to the real high-res image (PSNR, SSIM) and to its own low-res input."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional import structural_similarity_index_measure

from diffusion_pl.core.resize import DownsampleMode, downsample


def psnr(images: Tensor, targets: Tensor, data_range: float = 2.0) -> Tensor:
    """Per image, 10 log10(range^2 / MSE) in dB; images in [-1, 1] have range 2 (inputs are clamped to it)."""
    mse = (images.clamp(-1, 1).double() - targets.clamp(-1, 1).double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-20))


def ssim(images: Tensor, targets: Tensor) -> Tensor:
    """Per image, the structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) of [-1, 1] images."""
    return structural_similarity_index_measure(images.clamp(-1, 1).double(), targets.clamp(-1, 1).double(),
                                              data_range=2.0, reduction="none")


def consistency_error(images: Tensor, low_res: Tensor, factor: int, mode: DownsampleMode = "area") -> Tensor:
    """Per image, the RMS of down(SR(x_low)) - x_low: how far the output strays from its own low-res input."""
    return (downsample(images.double(), factor, mode) - low_res.double()).pow(2).flatten(1).mean(1).sqrt()
