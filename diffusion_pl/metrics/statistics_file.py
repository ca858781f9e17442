"""Reference statistics in an .npz, so that a reference is computed once: per feature space ``<space>.mu``,
``<space>.sigma``, ``<space>.num_images``, ``<space>.features`` (the kept subset), ``<space>.extractor`` and
``<space>.fingerprint``, and ``meta`` (JSON: the data source, split and image format). A pytorch-fid file (``mu`` and
``sigma`` only) is read as the ``inception`` space."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_pl.core.checkpoint_file import write_atomically
from diffusion_pl.core.errors import UserError
from diffusion_pl.metrics.feature_reference import FeatureReference
from diffusion_pl.metrics.frechet import GaussianMoments

#: The feature space a plain ``mu`` / ``sigma`` file (pytorch-fid's format) describes.
PLAIN_SPACE = "inception"


class StatisticsFileError(UserError, ValueError):
    """A reference statistics file that is missing, unreadable or lacks what a metric needs."""


def save_statistics(path: str | Path, references: dict[str, FeatureReference], meta: dict[str, Any]) -> Path:
    """Write ``references`` (by feature space) and ``meta`` to ``path`` atomically."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for space, reference in references.items():
        arrays[f"{space}.mu"] = reference.moments.mean.numpy()
        arrays[f"{space}.sigma"] = reference.moments.covariance.numpy()
        arrays[f"{space}.num_images"] = np.array(reference.moments.num)
        arrays[f"{space}.extractor"] = np.array(reference.extractor)
        arrays[f"{space}.fingerprint"] = np.array(reference.fingerprint or "")
        if reference.features is not None:
            arrays[f"{space}.features"] = reference.features.numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, [buffer.getbuffer()], what="reference statistics")
    return Path(path)


def _space(arrays: Any, prefix: str) -> FeatureReference:
    features = torch.from_numpy(arrays[f"{prefix}features"]) if f"{prefix}features" in arrays else None
    text = {name: str(arrays[f"{prefix}{name}"]) if f"{prefix}{name}" in arrays else "" for name in
            ("extractor", "fingerprint")}
    num = int(arrays[f"{prefix}num_images"]) if f"{prefix}num_images" in arrays else 0
    moments = GaussianMoments(torch.from_numpy(arrays[f"{prefix}mu"]).double(),
                              torch.from_numpy(arrays[f"{prefix}sigma"]).double(), num)
    return FeatureReference(moments, features, text["extractor"], text["fingerprint"] or None)


def load_statistics(path: str | Path) -> tuple[dict[str, FeatureReference], dict[str, Any]]:
    """The references (by feature space) and the meta data of a statistics file.

    Raises:
        StatisticsFileError: No such file, not an .npz, or no ``mu``/``sigma`` in it.
    """
    path = Path(path)
    if not path.is_file():
        raise StatisticsFileError(f"reference statistics file {path} not found: write one with `diffusion-pl-eval "
                                  "... --reference SOURCE --save-reference FILE.npz`, or give the data source")
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise StatisticsFileError(f"{path} is not an .npz of reference statistics ({error})") from error
    with archive as arrays:
        spaces = sorted({key.rsplit(".", 1)[0] for key in arrays if key.endswith(".mu")})
        references = {space: _space(arrays, f"{space}.") for space in spaces}
        if "mu" in arrays and "sigma" in arrays:
            references.setdefault(PLAIN_SPACE, _space(arrays, ""))
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        keys = sorted(arrays.files)
    if not references:
        raise StatisticsFileError(f"{path} holds no reference statistics (no mu and sigma arrays); it has {keys}")
    return references, meta
