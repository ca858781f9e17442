"""How often a classifier assigns generated samples to their target class (the check of guided sampling).

    python3 tools/sample_accuracy.py \
        --classifier runs/classifier_fashion_mnist/lightning_logs/version_0/checkpoints/last.ckpt \
        runs/cfg_fashion_mnist/lightning_logs/version_1/predictions/samples.npz [more.npz ...]

Each .npz is what guided `diffusion-pl predict` writes (keys ``samples``, uint8 N x H x W x C, and ``labels``);
for an unguided .npz give ``--labels 3`` or ``--labels 0,1,2`` (the classes the samples are scored against,
cycled like predict_labels).
Prints one Markdown row per file: overall accuracy and the accuracy per target class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from diffusion_pl.models.classifier import load_classifier_net


@torch.no_grad()
def target_accuracy(net: torch.nn.Module, samples: np.ndarray, labels: np.ndarray,
                    batch_size: int = 500) -> tuple[float, dict[int, float]]:
    """Fraction of ``samples`` (uint8 N x H x W x C) that ``net`` classifies as ``labels`` (N,), overall and per
    target class."""
    images = torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    predicted = torch.cat([net(batch).argmax(-1) for batch in images.split(batch_size)]).numpy()
    correct = predicted == labels
    return float(correct.mean()), {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a ClassifierModule checkpoint (clean classifier)")
    parser.add_argument("--labels", type=lambda text: [int(v) for v in text.split(",")], default=None,
                        help="comma-separated target classes, cycled, for files without a 'labels' array")
    parser.add_argument("npz", nargs="+")
    args = parser.parse_args()
    net = load_classifier_net(args.classifier)
    rows = []
    for path in args.npz:
        with np.load(path) as arrays:
            samples = arrays["samples"]
            if "labels" in arrays:
                labels = arrays["labels"]
            elif args.labels:
                labels = np.resize(np.array(args.labels), samples.shape[0])
            else:
                raise SystemExit(f"{path} has no 'labels' array (an unguided run): pass --labels")
        overall, per_class = target_accuracy(net, samples, labels)
        classes = " ".join(f"{c}:{a:.2f}" for c, a in per_class.items())
        rows.append(f"| {Path(path)} | {samples.shape[0]} | {overall:.4f} | {classes} |")
    sys.stdout.write("| samples | N | accuracy | per class |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
