"""How often a classifier assigns generated samples to their target class, and how close each class's samples are
to the real images of that class (the checks of guided sampling).

    python3 tools/sample_accuracy.py \
        --classifier runs/classifier_fashion_mnist/lightning_logs/version_0/checkpoints/last.ckpt \
        runs/cfg_fashion_mnist/lightning_logs/version_1/predictions/samples.npz [more.npz ...]

Each .npz is what guided `diffusion-pl predict` writes (keys ``samples``, uint8 N x H x W x C, and ``labels``);
for an unguided .npz give ``--labels 3`` or ``--labels 0,1,2`` (the classes the samples are scored against,
cycled like the predict labels of ``Seeds``).
Prints one Markdown row per file: overall accuracy and the accuracy per target class.

With ``--fid-source diffusion_pl.data.FashionMNIST`` the rows also give the FID per target class: the samples aimed
at class c against all real ``--fid-split`` images of class c, in the classifier's penultimate features (the domain
FID of overlays/fid_fashion_mnist.yaml). Accurate samples with a per-class FID near the floor are on target and as
varied as the class; samples collapsed onto a few prototypes get a high FID. A last row gives that floor: as many
real images per class as the first file has, taken from the other split and scored the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_pl.core.tensors import from_uint8
from diffusion_pl.data import ImageData, ImageFormat
from diffusion_pl.data.sources import source_from_text
from diffusion_pl.metrics import (
    ClassifierFeatures,
    GenerativeMetrics,
    ReferenceStatistics,
    reference_statistics,
)


def to_model_range(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images N x H x W x C (numpy) or N x C x H x W (torch) -> float N x C x H x W in [-1, 1]."""
    return from_uint8(torch.from_numpy(images).permute(0, 3, 1, 2) if isinstance(images, np.ndarray) else images)


@torch.no_grad()
def target_accuracy(net: torch.nn.Module, samples: np.ndarray, labels: np.ndarray,
                    batch_size: int = 500) -> tuple[float, dict[int, float]]:
    """Fraction of ``samples`` (uint8 N x H x W x C) that ``net`` classifies as ``labels`` (N,), overall and per
    target class."""
    predicted = torch.cat([net(batch).argmax(-1) for batch in to_model_range(samples).split(batch_size)]).numpy()
    correct = predicted == labels
    return float(correct.mean()), {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}


@torch.no_grad()
def class_references(extractor: ClassifierFeatures, real: ImageData, batch_size: int = 500
                     ) -> dict[int, ReferenceStatistics]:
    """Feature statistics of the real images of each class, computed once for every file and the floor."""
    references = {}
    for c in real.labels.unique().tolist():
        images = to_model_range(real.images[real.labels == c])
        references[c] = reference_statistics(images.split(batch_size), extractor, len(images), kid_size=len(images))
    return references


@torch.no_grad()
def frechet_distance(extractor: ClassifierFeatures, reference: ReferenceStatistics, generated: Tensor) -> float:
    """FID (Heusel et al. 2017) of ``generated`` images (float, [-1, 1]) against real ``reference`` statistics, in
    the extractor's features."""
    metrics = GenerativeMetrics(extractor.num_features, kid_subsets=1,
                                kid_subset_size=min(reference.num_images, len(generated)))
    metrics.load_reference(reference)
    metrics.update(extractor(generated))
    return metrics.compute(seed=0)["fid"]


def per_class_fid(extractor: ClassifierFeatures, references: dict[int, ReferenceStatistics], samples: np.ndarray,
                  labels: np.ndarray) -> dict[int, float]:
    """FID of the samples aimed at each class against the real images of that class."""
    return {int(c): frechet_distance(extractor, references[int(c)], to_model_range(samples[labels == c]))
            for c in np.unique(labels)}


def real_floor(extractor: ClassifierFeatures, references: dict[int, ReferenceStatistics], other: ImageData,
               counts: dict[int, int]) -> dict[int, float]:
    """Per-class FID of ``counts[c]`` real images of class c from ``other`` (the first ones) against the references:
    what a generator indistinguishable from the data would score with that many samples."""
    return {c: frechet_distance(extractor, references[c], to_model_range(other.images[other.labels == c][:n]))
            for c, n in counts.items()}


def read_samples(path: str, cycled_labels: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Samples and target labels of one .npz (``cycled_labels`` for a file without a ``labels`` array)."""
    with np.load(path) as arrays:
        samples = arrays["samples"]
        if "labels" in arrays:
            return samples, arrays["labels"]
    if not cycled_labels:
        raise SystemExit(f"{path} has no 'labels' array (an unguided run): pass --labels")
    return samples, np.resize(np.array(cycled_labels), samples.shape[0])


def format_per_class(values: dict[int, float], spec: str) -> str:
    """``class:value`` pairs, each value formatted with ``spec``."""
    return " ".join(f"{c}:{v:{spec}}" for c, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a ClassifierModule checkpoint (clean classifier)")
    parser.add_argument("--labels", type=lambda text: [int(v) for v in text.split(",")], default=None,
                        help="comma-separated target classes, cycled, for files without a 'labels' array")
    parser.add_argument("--fid-source", default=None,
                        help="source part of the real images for the per-class FID (e.g. "
                             "diffusion_pl.data.FashionMNIST)")
    parser.add_argument("--fid-split", choices=("train", "test"), default="test",
                        help="split of the real images the samples are compared with (the floor uses the other)")
    parser.add_argument("--resize-mode", choices=("pad", "resize"), default="pad",
                        help="how real images are brought to the classifier's size, as in the data config")
    parser.add_argument("npz", nargs="+")
    args = parser.parse_args()
    extractor = ClassifierFeatures(args.classifier)
    net = extractor.net
    references = other = None
    if args.fid_source:
        source, image_format = source_from_text(args.fid_source), ImageFormat(net.image_size, net.in_channels,
                                                                              args.resize_mode)
        references = class_references(extractor, source.load(args.fid_split, image_format))
        other = source.load("train" if args.fid_split == "test" else "test", image_format)
    header = "| samples | N | accuracy | per class |" + (" FID per class |" if references else "")
    rows = [header, "|---" * (header.count("|") - 1) + "|"]
    counts: dict[int, int] = {}
    for path in args.npz:
        samples, labels = read_samples(path, args.labels)
        overall, per_class = target_accuracy(net, samples, labels)
        row = f"| {Path(path)} | {samples.shape[0]} | {overall:.4f} | {format_per_class(per_class, '.2f')} |"
        if references is not None:
            row += f" {format_per_class(per_class_fid(extractor, references, samples, labels), '.4g')} |"
            counts = counts or {int(c): int((labels == c).sum()) for c in np.unique(labels)}
        rows.append(row)
    if references is not None and other is not None:
        floor = real_floor(extractor, references, other, counts)
        rows.append(f"| real {args.fid_source} images (floor) | {sum(counts.values())} | | | "
                    f"{format_per_class(floor, '.4g')} |")
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
