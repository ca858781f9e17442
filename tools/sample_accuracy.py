"""How often a classifier assigns generated samples to their target class, and how close each class's samples are
to the real images of that class (the checks of guided sampling).

    python3 tools/sample_accuracy.py \
        --classifier runs/classifier_fashion_mnist/lightning_logs/version_0/checkpoints/last.ckpt \
        runs/cfg_fashion_mnist/lightning_logs/version_1/predictions/samples.npz [more.npz ...]

Each .npz is what guided `diffusion-pl predict` writes (keys ``samples``, uint8 N x H x W x C, and ``labels``);
for an unguided .npz give ``--labels 3`` or ``--labels 0,1,2`` (the classes the samples are scored against,
cycled like the predict labels of ``Seeds``).
Prints one Markdown row per file: overall accuracy and the accuracy per target class.

With ``--fid-source FashionMNIST`` the rows also give the FID per target class: the samples aimed at class c
against all real ``--fid-split`` images of class c, in the classifier's penultimate features (the domain FID of
overlays/fid_fashion_mnist.yaml). Accurate samples with a per-class FID near the floor are on target and as
varied as the class; samples collapsed onto a few prototypes get a high FID. A last row gives that floor: as many
real images per class as the first file has, taken from the other split and scored the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import Tensor

from diffusion_pl.cli.errors import user_errors_exit
from diffusion_pl.data import ImageData, ImageFormat
from diffusion_pl.data.image_files import read_image_files
from diffusion_pl.metrics import ClassifierFeatures, RealData, RealReference, on_target
from diffusion_pl.metrics.on_target import target_labels


def class_references(extractor: ClassifierFeatures, real: ImageData, other: ImageData) -> dict[int, RealReference]:
    """The real images of each class as a reference, with the other split's images of that class held out for the
    floor; computed once for every file."""
    return {c: RealReference.of_images(extractor, real.images[real.labels == c], other.images[other.labels == c])
            for c in real.labels.unique().tolist()}


def format_per_class(values: dict[int, float], spec: str) -> str:
    """``class:value`` pairs, each value formatted with ``spec``."""
    return " ".join(f"{c}:{v:{spec}}" for c, v in values.items())


def per_class_fid(references: dict[int, RealReference], images: Tensor, labels: Tensor) -> dict[int, float]:
    """FID of the samples aimed at each class against the real images of that class."""
    return {int(c): references[int(c)].fid(images[labels == c]) for c in labels.unique()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a ClassifierModule checkpoint (clean classifier)")
    parser.add_argument("--labels", type=lambda text: [int(v) for v in text.split(",")], default=None,
                        help="comma-separated target classes, cycled, for files without a 'labels' array")
    parser.add_argument("--fid-source", default=None,
                        help="data source part of the real images for the per-class FID (e.g. FashionMNIST)")
    parser.add_argument("--fid-split", choices=("train", "test"), default="test",
                        help="split of the real images the samples are compared with (the floor uses the other)")
    parser.add_argument("--resize-mode", choices=("pad", "resize"), default="pad",
                        help="how real images are brought to the classifier's size, as in the data config")
    parser.add_argument("npz", nargs="+")
    args = parser.parse_args()
    extractor = ClassifierFeatures(args.classifier)
    net = extractor.net
    references = None
    if args.fid_source:
        data = RealData.from_text(f"{args.fid_source}:{args.fid_split}",
                                  ImageFormat(net.image_size, net.in_channels, args.resize_mode))
        references = class_references(extractor, data.load(), data.other_split().load())
    header = "| samples | N | accuracy | per class |" + (" FID per class |" if references else "")
    rows = [header, "|---" * (header.count("|") - 1) + "|"]
    counts: dict[int, int] = {}
    for path in args.npz:
        files = read_image_files(path, "samples")
        labels = target_labels(files.labels, args.labels, len(files.images), path)
        scores = on_target(net, files.images, labels)
        row = f"| {Path(path)} | {len(files.images)} | {scores.share:.4f} | {format_per_class(scores.per_class, '.2f')} |"
        if references is not None:
            row += f" {format_per_class(per_class_fid(references, files.images, labels), '.4g')} |"
            counts = counts or {int(c): int((labels == c).sum()) for c in labels.unique()}
        rows.append(row)
    if references is not None:
        floor = {c: references[c].floor(n) for c, n in counts.items()}
        rows.append(f"| real {args.fid_source} images (floor) | {sum(counts.values())} | | | "
                    f"{format_per_class(floor, '.4g')} |")
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    with user_errors_exit():
        main()
