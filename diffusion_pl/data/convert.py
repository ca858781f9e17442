"""Converting a source once into LitData's optimized chunks, to stream it (:class:`~diffusion_pl.data.Streaming`).

A converted dataset is a directory (local, or uploaded to an object store such as ``s3://bucket/imagenet64``) holding
one LitData dataset per split (``train/``, ``val/``, ``test/``, written by :func:`litdata.optimize`), the SHA-256 of
every chunk file beside each split's ``index.json``, and ``diffusion_pl.json``. Each item stores the image (PNG or
JPEG bytes, or uint8 C x H x W), its label and its caption.

    python tools/convert_dataset.py --source diffusion_pl.data.ImageFolder --source.root photos/ --source.lazy true \
        --output photos_optimized/ --image_format.image_size 64
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from litdata import optimize
from PIL import Image

from diffusion_pl.core.errors import UserError
from diffusion_pl.core.spec import describe
from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import Images, holdout_indices
from diffusion_pl.data.sources.base import ImageSource
from diffusion_pl.data.streaming.metadata import METADATA_FILE, StorageFormat, StreamingMetadata, write_checksums

log = logging.getLogger(__name__)

STORAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "raw")


class ConversionError(UserError, ValueError):
    """A conversion that cannot run as asked (its output exists, an unknown storage format, ...)."""


def encode_item(data: Images, storage: StorageFormat, quality: int, index: int) -> dict[str, Any]:
    """Item ``index`` of ``data`` as LitData stores it: ``{"image": PNG/JPEG bytes or uint8 C x H x W, "label": int,
    "caption": str}`` (an empty caption: made from the class name when read)."""
    image = data.image(index)
    if storage == "raw":
        stored: bytes | np.ndarray = image.numpy()
    else:
        array = image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        pil.save(buffer, format="PNG" if storage == "png" else "JPEG", quality=quality)
        stored = buffer.getvalue()
    return {"image": stored, "label": int(data.labels[index]), "caption": data.caption(index) or ""}


def convert_source(source: ImageSource, output: str, image_format: ImageFormat, *, storage: StorageFormat = "png",
                   quality: int = 95, val_fraction: float = 0.05, seed: int = 0, num_workers: int = 1,
                   chunk_bytes: str = "64MB") -> StreamingMetadata:
    """Convert every split of ``source`` into LitData chunks under ``output`` (``train``, ``val``, ``test``).

    ``val`` holds the same images an :class:`~diffusion_pl.data.ImageDataModule` holds out with ``val_fraction`` and
    ``seed``. A lazily read image folder (``ImageFolder(lazy=True)``) is decoded file by file in the workers, never
    whole.

    Args:
        source: The source part, e.g. ``ImageFolder("photos/", lazy=True)`` or ``FashionMNIST()``.
        output: A new local directory (upload it to an object store to stream it from there).
        image_format: The format the images are converted to (its downsampling included).
        storage: ``"png"`` (lossless), ``"jpeg"`` (``quality``) or ``"raw"`` uint8.
        quality: JPEG quality.
        val_fraction: Fraction of the train split written as ``val``.
        seed: Seed of that hold-out.
        num_workers: LitData worker processes.
        chunk_bytes: Size of each chunk file.

    Returns:
        The metadata written to ``output/diffusion_pl.json``.
    """
    if storage not in STORAGE_FORMATS:
        raise ConversionError(f"storage must be one of {', '.join(STORAGE_FORMATS)}, got {storage!r}")
    target = Path(output).expanduser()
    if target.exists() and any(target.iterdir()):
        raise ConversionError(f"the output {output} is not empty: choose a new directory or delete it")
    source.prepare()
    train = source.load("train", image_format)
    if train is None:
        raise ConversionError(f"{describe(source.identity())} has no train split to convert")
    keep, held = holdout_indices(len(train), val_fraction, seed)
    splits = {"train": train.subset(keep), "val": train.subset(held), "test": source.load("test", image_format)}
    counts = {}
    for name, data in splits.items():
        if data is None or len(data) == 0:
            continue
        log.info("writing %d %s images to %s", len(data), name, target / name)
        # LitData sets the start method process-wide (default spawn): keep the process's own
        optimize(fn=partial(encode_item, data, storage, quality), inputs=list(range(len(data))),
                 output_dir=str(target / name), num_workers=num_workers, chunk_bytes=chunk_bytes, verbose=False,
                 start_method=multiprocessing.get_start_method())
        write_checksums(target / name)
        counts[name] = len(data)
    metadata = StreamingMetadata(tuple(train.class_names), storage, image_format.image_size, image_format.channels,
                                 counts, val_fraction, seed, describe(source.identity(), limit=1000))
    (target / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2))
    return metadata
