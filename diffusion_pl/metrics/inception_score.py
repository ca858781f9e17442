"""The Inception Score of a classifier's logits (Salimans et al. 2016, Sec. 4)."""

from __future__ import annotations

import torch
from torch import Tensor


def inception_score(logits: Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over a split; the mean and (sample) standard
    deviation over ``splits`` splits of the shuffled images, as torchmetrics' ``InceptionScore`` (the same shuffle
    for the same seed; a private generator leaves the global RNG untouched).

    Args:
        logits: (N, K) class logits of the images.
        splits: Number of splits.
        seed: Seed of the shuffle.
    """
    if splits < 1 or len(logits) < splits:
        raise ValueError(f"the Inception Score needs at least `splits` = {splits} >= 1 images, got {len(logits)}")
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))
    log_p = logits[order.to(logits.device)].double().log_softmax(dim=1)
    scores = []
    for part in log_p.chunk(splits, dim=0):
        log_marginal = part.exp().mean(0, keepdim=True).log()
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp())
    values = torch.stack(scores)
    return float(values.mean()), float(values.std()) if splits > 1 else 0.0
