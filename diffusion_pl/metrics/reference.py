"""Reference statistics of real images, computed once per (data, split, size, extractor) and cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.metrics.extractor import FeatureExtractor

log = logging.getLogger(__name__)

#: Bump when the file layout or the way statistics are computed changes (old cache files are then ignored).
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ReferenceStatistics:
    """What FID and KID need from the real images.

    FID needs only the first two moments, kept as the sums torchmetrics' ``FrechetInceptionDistance``
    accumulates (so loading them is bit-identical to feeding the real images); KID needs real features
    themselves, of which a seeded random subset is kept.

    Attributes:
        num_images: Number of real images n.
        feature_sum: sum_i f_i, (D,) float64.
        feature_outer_sum: sum_i f_i f_i^T, (D, D) float64.
        kid_features: (N_kid, D) float32 features of a seeded random subset of the images.
    """

    num_images: int
    feature_sum: Tensor
    feature_outer_sum: Tensor
    kid_features: Tensor


def reference_statistics(batches: Iterable[Tensor], extractor: FeatureExtractor, num_images: int,
                         kid_size: int, seed: int = 0) -> ReferenceStatistics:
    """Accumulate :class:`ReferenceStatistics` over batches of real images.

    Args:
        batches: Real images in [-1, 1], in a fixed order, ``num_images`` in total, on the extractor's device.
        extractor: The feature extractor.
        num_images: Total number of images the batches yield.
        kid_size: Number of images whose features are kept for KID (all when fewer exist).
        seed: Seed of the KID subset.
    """
    kid_index = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:kid_size]
    keep = torch.zeros(num_images, dtype=torch.bool)
    keep[kid_index] = True
    total: Tensor | None = None
    outer: Tensor | None = None
    kept: list[Tensor] = []
    seen = 0
    with torch.no_grad():
        for images in batches:
            features = extractor(images).features.double()
            if total is None or outer is None:  # accumulate on the extractor's device, move once at the end
                total, outer = features.new_zeros(features.shape[1]), features.new_zeros(2 * features.shape[1:])
            total += features.sum(0)
            outer += features.T @ features
            kept.append(features[keep[seen:seen + len(features)].to(features.device)].float().cpu())
            seen += len(features)
    if seen != num_images or total is None or outer is None:
        raise ValueError(f"the reference batches held {seen} images, expected {num_images} (> 0)")
    return ReferenceStatistics(num_images, total.cpu(), outer.cpu(), torch.cat(kept))


def default_cache_dir() -> Path:
    """``$DIFFUSION_PL_CACHE/fid`` or ``$XDG_CACHE_HOME/diffusion_pl/fid`` (``~/.cache/diffusion_pl/fid``)."""
    if root := os.environ.get("DIFFUSION_PL_CACHE"):
        return Path(root) / "fid"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusion_pl" / "fid"


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """File of the statistics identified by ``key`` (JSON-serialisable; readable prefix + hash of the whole key)."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True).encode()).hexdigest()
    prefix = "-".join(str(key[k]) for k in ("source", "split", "image_size", "extractor") if k in key)
    return Path(cache_dir) / f"{prefix.replace(os.sep, '_')}-{digest[:16]}.pt"


def save_reference(path: Path, key: dict[str, Any], stats: ReferenceStatistics) -> None:
    """Write ``stats`` with its ``key`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CACHE_FORMAT, "key": json.dumps(key, sort_keys=True), "num_images": stats.num_images,
               "feature_sum": stats.feature_sum, "feature_outer_sum": stats.feature_outer_sum,
               "kid_features": stats.kid_features}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_reference(path: Path, key: dict[str, Any]) -> ReferenceStatistics | None:
    """The statistics stored at ``path`` for exactly ``key``, or None when absent or written for another key."""
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CACHE_FORMAT or payload.get("key") != json.dumps(key, sort_keys=True):
        return None
    return ReferenceStatistics(payload["num_images"], payload["feature_sum"], payload["feature_outer_sum"],
                               payload["kid_features"])


def cached_reference(cache_dir: str | Path, key: dict[str, Any],
                     compute: Callable[[], ReferenceStatistics]) -> ReferenceStatistics:
    """Load the statistics for ``key`` from ``cache_dir``, or ``compute`` and cache them.

    Args:
        cache_dir: Cache folder.
        key: Everything the statistics depend on (data, split, size, extractor name and weights fingerprint).
        compute: Computes the statistics on a cache miss.
    """
    path = cache_path(cache_dir, key)
    if (stats := load_reference(path, key)) is not None:
        log.info("reference statistics loaded from %s", path)
        return stats
    stats = compute()
    save_reference(path, key, stats)
    log.info("reference statistics of %d images cached in %s", stats.num_images, path)
    return stats
