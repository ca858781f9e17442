"""Kernel Inception Distance: the unbiased MMD^2 with a cubic polynomial kernel (Binkowski et al. 2018, Sec. 3)."""

from __future__ import annotations

import torch
from torch import Tensor


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x . y / d + 1)^3 for every pair of rows, (N, M) (Binkowski et al. 2018, eq. after (4))."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def unbiased_mmd2(real: Tensor, fake: Tensor) -> Tensor:
    """The unbiased estimate of MMD^2 from m real and m generated features: the means of k over distinct real pairs and
    distinct generated pairs, minus twice the mean over all real-generated pairs (Gretton et al. 2012, eq. 3)."""
    m = len(real)
    k_rr, k_ff, k_rf = polynomial_kernel(real, real), polynomial_kernel(fake, fake), polynomial_kernel(real, fake)
    within = (k_rr.sum() - k_rr.diagonal().sum() + k_ff.sum() - k_ff.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_rf.sum() / m**2


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: the mean and (population) standard deviation of :func:`unbiased_mmd2` over random subsets.

    Each subset draws ``subset_size`` real and ``subset_size`` generated features without replacement, as
    torchmetrics' ``KernelInceptionDistance`` does (the same draws for the same seed). KID is unbiased in N, unlike
    FID, but its variance grows as N falls.

    Args:
        real: (N_r, D) real features.
        fake: (N_g, D) generated features.
        subsets: Number of subsets averaged over.
        subset_size: Features per subset, at most N_r and N_g.
        seed: Seed of the subsets (a private generator: the global RNG is untouched).
    """
    if not 2 <= subset_size <= min(len(real), len(fake)):
        raise ValueError(f"KID needs 2 <= subset_size <= min(N_real, N_generated); got {subset_size} with "
                         f"{len(real)} real and {len(fake)} generated features")
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        real_index = torch.randperm(len(real), generator=generator)[:subset_size]
        fake_index = torch.randperm(len(fake), generator=generator)[:subset_size]
        scores.append(unbiased_mmd2(real[real_index.to(real.device)], fake[fake_index.to(fake.device)]))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))
