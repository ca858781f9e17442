"""Improved precision and recall: k-NN manifolds of real and generated features (Kynkäänniemi et al. 2019, Sec. 3)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Rows of the pairwise distance matrix computed at a time (bounded memory for 50k x 50k).
_CHUNK = 1024


def knn_radii(features: Tensor, k: int = 3) -> Tensor:
    """||phi - NN_k(phi, Phi)|| for every phi in Phi: the distance to its k-th nearest other feature, (N,)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k-NN radii need 1 <= k < N; got k = {k} with {len(features)} features")
    # the k + 1 smallest distances of a row include the feature itself (distance 0)
    return torch.cat([torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(_CHUNK)])


def manifold_share(points: Tensor, manifold: Tensor, radii: Tensor) -> float:
    """The share of ``points`` inside the manifold: within radii[j] of some manifold[j] (eq. 1, averaged as eq. 2)."""
    inside = [(torch.cdist(chunk, manifold) <= radii).any(dim=1) for chunk in points.split(_CHUNK)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Precision (share of generated features inside the real manifold) and recall (share of real features inside the
    generated manifold), each manifold the union of balls reaching every feature's k-th nearest neighbour.

    The paper uses k = 3 and equally many real and generated features (its numbers depend on both).

    Args:
        real: (N_r, D) real features.
        fake: (N_g, D) generated features.
        k: The neighbour that sets each ball's radius.
    """
    real, fake = real.double(), fake.double()
    return (manifold_share(fake, real, knn_radii(real, k)), manifold_share(real, fake, knn_radii(fake, k)))
