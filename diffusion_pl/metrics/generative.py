"""FID, KID and Inception Score of generated images against cached real statistics, synced over DDP ranks."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_pl.metrics.extractor import Features
from diffusion_pl.metrics.reference import ReferenceStatistics


class PrecomputedFeatures(nn.Identity):
    """Stands in for the torchmetrics metrics' own network: features are extracted once and shared by all metrics.

    Args:
        num_features: Width of the features the metric will receive.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


class GenerativeMetrics(nn.Module):
    """torchmetrics FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and optionally IS (Salimans et al. 2016).

    The real side comes from :class:`ReferenceStatistics` loaded into the metric states of one process only
    (the *owner*, global rank 0); every other rank keeps zero sums and an empty feature list, so the
    all-reduced FID sums and the gathered KID features equal the reference exactly, whatever the world size.
    Each rank adds the features of its own generated images with a single :meth:`update` per evaluation, so
    list states hold one tensor per rank and gather in rank order (sample order when ranks hold contiguous
    shards). ``compute`` syncs on every rank and returns the same numbers everywhere.

    FID is torchmetrics' computation from the float64 sums: mu, Sigma from the moments, then
    ``||mu_r - mu_g||^2 + tr(Sigma_r) + tr(Sigma_g) - 2 sum_i sqrt(lambda_i(Sigma_r Sigma_g))``. The eigenvalues of
    the product of two PSD matrices are real and non-negative, so taking the real part of the complex
    square roots of the float64 eigenvalues is stable even for singular covariances (fewer samples than
    dimensions), where ``scipy.linalg.sqrtm`` can return complex or inaccurate roots; the tests check it against
    ``sqrtm`` and against closed forms for Gaussians.

    Args:
        num_features: Width D of the features.
        num_logits: Width of the logits for the Inception Score, or None to skip IS.
        kid_subsets: Number of random subsets KID averages over.
        kid_subset_size: Size of each KID subset; at most the number of real and of generated features.
        is_splits: Number of splits of the Inception Score.
    """

    def __init__(self, num_features: int, num_logits: int | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, is_splits: int = 10) -> None:
        super().__init__()
        self.num_features = num_features
        with warnings.catch_warnings():  # KID/IS warn that they store features: that is the point here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.fid = FrechetInceptionDistance(PrecomputedFeatures(num_features), reset_real_features=False)
            self.kid = KernelInceptionDistance(PrecomputedFeatures(num_features), subsets=kid_subsets,
                                               subset_size=kid_subset_size, reset_real_features=False)
            self.inception_score = None if num_logits is None else InceptionScore(
                PrecomputedFeatures(num_logits), splits=is_splits)

    def load_reference(self, stats: ReferenceStatistics | None) -> None:
        """Load the real side: ``stats`` on the owner rank, None on every other rank."""
        device = self.fid.real_features_sum.device
        if stats is None:
            self.kid.real_features = [torch.empty(0, self.num_features, device=device)]
            return
        self.fid.real_features_sum = stats.feature_sum.to(device, torch.float64)
        self.fid.real_features_cov_sum = stats.feature_outer_sum.to(device, torch.float64)
        self.fid.real_features_num_samples = torch.tensor(stats.num_images, device=device)
        self.kid.real_features = [stats.kid_features.to(device)]

    def update(self, generated: Features) -> None:
        """Add this rank's generated features (possibly none: a (0, D) tensor); call once per evaluation."""
        self.fid.update(generated.features, real=False)
        self.kid.update(generated.features.float(), real=False)  # float32, as the cached real KID features
        if self.inception_score is not None:
            if generated.logits is None:
                raise ValueError("the Inception Score needs logits, but the extractor returned none")
            self.inception_score.update(generated.logits)

    def compute(self, seed: int) -> dict[str, float]:
        """Synced FID, KID mean/std and IS mean/std; KID's and IS's random subsets are drawn from ``seed``.

        The subsets come from a forked CPU RNG, so every rank draws the same ones and the global RNG (and with
        it an exactly resumable training run) is untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            values = {"fid": self.fid.compute()}
            values["kid"], values["kid_std"] = self.kid.compute()
            if self.inception_score is not None:
                values["is"], values["is_std"] = self.inception_score.compute()
        return {name: float(value) for name, value in values.items()}

    def reset(self) -> None:
        """Forget the generated features; the real side stays."""
        for metric in (self.fid, self.kid, self.inception_score):
            if metric is not None:
                metric.reset()


def empty_features(num_features: int, num_logits: int | None, device: torch.device) -> Features:
    """Features of zero images (a rank without generated images still takes part in the sync)."""
    logits: Tensor | None = None if num_logits is None else torch.empty(0, num_logits, device=device)
    return Features(torch.empty(0, num_features, device=device), logits)
