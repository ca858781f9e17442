"""Convert a source part into LitData's optimized chunks, for the ``diffusion_pl.data.Streaming`` source.

    python tools/convert_dataset.py --source diffusion_pl.data.ImageFolder --source.root photos/ --source.lazy true \
        --output photos_optimized/ --image_format.image_size 64 --image_format.resize_mode resize --storage jpeg
    python tools/convert_dataset.py --source diffusion_pl.data.Torchvision --source.name CIFAR10 --source.root data/ \
        --output cifar10_optimized/
    python tools/convert_dataset.py --source diffusion_pl.data.FashionMNIST --output fmnist_optimized/ \
        --image_format.channels 1 --storage raw

The source is any ``ImageSource`` part, named as in a config's ``data.init_args.source`` (``--source CLASS_PATH``
and ``--source.ARG VALUE``); ``ImageFolder`` with ``lazy: true`` is decoded file by file in the workers, never whole.
The images are converted to ``--image_format`` (RGB at 32x32 unless told). The output holds ``train/``, ``val/`` (the
``--val_fraction`` an ImageDataModule with the same ``--seed`` holds out) and ``test/`` (where the source has one),
each with LitData's chunks and ``index.json`` and the SHA-256 of every chunk (``chunk_sha256.json``, checked when the
chunks are read), and ``diffusion_pl.json``. Train on it with
``--data.init_args.source=diffusion_pl.data.Streaming --data.init_args.source.url_or_dir=OUTPUT`` (or
overlays/streaming.yaml); upload the directory to an object store and give its URL (``s3://bucket/name``) to stream
it from there.
"""

from __future__ import annotations

import logging
import sys

from jsonargparse import ArgumentParser

from diffusion_pl.core.errors import UserError
from diffusion_pl.data import ImageFormat, ImageSource
from diffusion_pl.data.convert import STORAGE_FORMATS, convert_source


def parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_subclass_arguments(ImageSource, "source", required=True, help="the source part to convert")
    parser.add_class_arguments(ImageFormat, "image_format", help="the format the images are converted to")
    parser.set_defaults({"image_format.channels": 3})
    parser.add_argument("--output", required=True, help="a new directory")
    parser.add_argument("--storage", default="png", choices=STORAGE_FORMATS,
                        help="png (lossless), jpeg (smaller, lossy) or raw uint8")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=1, help="LitData worker processes")
    parser.add_argument("--chunk_bytes", default="64MB")
    return parser


def main() -> None:
    parse = parser()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse.instantiate_classes(parse.parse_args())
        metadata = convert_source(
            config.source, config.output, config.image_format, storage=config.storage, quality=config.quality,
            val_fraction=config.val_fraction, seed=config.seed, num_workers=config.num_workers,
            chunk_bytes=config.chunk_bytes)
    except (UserError, ValueError) as error:  # a value a part refuses says what to fix
        sys.exit(f"error: {error}")
    counts = ", ".join(f"{name} {count}" for name, count in metadata.splits.items())
    logging.getLogger("convert_dataset").info("wrote %s (%s images, %s)", config.output, counts, metadata.storage)


if __name__ == "__main__":
    main()
