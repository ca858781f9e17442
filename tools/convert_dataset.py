"""Convert a data source into LitData's optimized chunks, for ``data.init_args.source: streaming``.

    python tools/convert_dataset.py --source image_folder --root photos/ --output photos_optimized/ \
        --image-size 64 --channels 3 --resize-mode resize --storage jpeg
    python tools/convert_dataset.py --source cifar10 --root data/ --output cifar10_optimized/ --channels 3
    python tools/convert_dataset.py --source fashion_mnist --output fmnist_optimized/ --channels 1 --storage raw

An image folder has one subfolder per class (or ``train/`` and ``test/`` each holding them); ``<image>.txt`` beside
an image is its caption. The output holds ``train/``, ``val/`` (the ``--val-fraction`` an ImageDataModule with the
same ``--seed`` holds out) and ``test/`` (where the source has one), each with LitData's chunks and ``index.json`` and
the SHA-256 of every chunk (``chunk_sha256.json``, checked when the chunks are read), and ``diffusion_pl.json``. Train
on it with ``--data.init_args.source=streaming --data.init_args.root=OUTPUT`` (or configs/overlays/streaming.yaml);
upload the directory to an object store and give its URL (``s3://bucket/name``) as the root to stream it from there.
"""

from __future__ import annotations

import argparse
import logging
import sys

from diffusion_pl.core.errors import UserError
from diffusion_pl.data.sources import SOURCE_NAMES
from diffusion_pl.data.streaming import STORAGE_FORMATS, convert_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=[s for s in SOURCE_NAMES if s != "streaming"])
    parser.add_argument("--root", default=None, help="the source's folder (required for image_folder)")
    parser.add_argument("--output", required=True, help="a new directory")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--resize-mode", default="pad", choices=("pad", "resize"))
    parser.add_argument("--storage", default="png", choices=STORAGE_FORMATS,
                        help="png (lossless), jpeg (smaller, lossy) or raw uint8")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1, help="LitData worker processes")
    parser.add_argument("--chunk-bytes", default="64MB")
    parser.add_argument("--no-download", action="store_true", help="never try a torchvision download")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        metadata = convert_source(
            args.source, args.output, root=args.root, image_size=args.image_size, channels=args.channels,
            resize_mode=args.resize_mode, storage=args.storage, quality=args.quality, val_fraction=args.val_fraction,
            seed=args.seed, num_workers=args.num_workers, chunk_bytes=args.chunk_bytes, download=not args.no_download)
    except UserError as error:
        sys.exit(f"error: {error}")
    counts = ", ".join(f"{name} {count}" for name, count in metadata.splits.items())
    logging.getLogger("convert_dataset").info("wrote %s (%s images, %s)", args.output, counts, metadata.storage)


if __name__ == "__main__":
    main()
