"""The Fréchet distance between Gaussians fitted to two feature sets: FID (Heusel et al. 2017, eq. 6).

**FID depends on the number of images N.** The plug-in estimate from N images is biased upward, roughly
FID_N = FID_inf + c / N with a slope c that differs between generators (Chong & Forsyth 2020, "Effectively Unbiased
FID and Inception Score and where to find them"), so numbers are comparable only at equal N, equal reference and equal
feature extractor. The 50k protocol (50,000 samples against the training set's statistics, Inception features) is the
one published tables use; the in-training FID of :class:`~diffusion_pl.callbacks.FID` (``num_samples``, e.g. 500 to
10,000) is larger than the 50k value of the same model and serves to compare checkpoints of one run. The real-data
floor (the FID of N held-out real images against the same reference) shows the size of that bias at the N used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMoments:
    """Mean and unbiased covariance of N feature vectors (float64).

    Attributes:
        mean: mu, (D,).
        covariance: Sigma = sum_i (f_i - mu)(f_i - mu)^T / (N - 1), (D, D).
        num: N.
    """

    mean: Tensor
    covariance: Tensor
    num: int

    @classmethod
    def of(cls, features: Tensor) -> GaussianMoments:
        """The moments of ``features`` (N, D), N >= 2."""
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"moments need (N >= 2, D) features, got shape {tuple(features.shape)}")
        values = features.double()
        return cls(values.mean(0), torch.cov(values.T).reshape(values.shape[1], values.shape[1]), len(values))


def frechet_distance(a: GaussianMoments, b: GaussianMoments) -> float:
    """d^2 = ||mu_a - mu_b||^2 + tr(Sigma_a + Sigma_b - 2 (Sigma_a Sigma_b)^(1/2)) (Heusel et al. 2017, eq. 6).

    tr((Sigma_a Sigma_b)^(1/2)) is the sum of the square roots of the eigenvalues of Sigma_a Sigma_b, which are real
    and non-negative (a product of two PSD matrices is similar to a PSD one); their real parts are taken after the
    complex square root, which stays stable for singular covariances (fewer images than features), as torchmetrics.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"the feature widths differ: {tuple(a.mean.shape)} and {tuple(b.mean.shape)}")
    mean_term = (a.mean.double() - b.mean.double()).square().sum()
    product = a.covariance.double() @ b.covariance.double()
    root_trace = torch.linalg.eigvals(product).sqrt().real.sum()
    return float(mean_term + a.covariance.trace() + b.covariance.trace() - 2 * root_trace)
