"""Scores of inpainting and interpolation outputs of `diffusion-pl predict` (overlays/inpaint.yaml, interpolate.yaml).

    python3 tools/pipeline_report.py --classifier CLEAN_CLASSIFIER.ckpt --fid-source FashionMNIST \
        inpaint runs/.../predictions/samples.npz [more.npz ...]
    python3 tools/pipeline_report.py --classifier CLEAN_CLASSIFIER.ckpt interpolate runs/.../samples.npz [...]

inpaint: one Markdown row per file (keys samples, inputs, masks, labels): the share of completions the separately
trained clean classifier puts in the image's true class (and the same for the unmasked inputs), the domain FID of
the completions against the real --fid-split images with the floor of as many real images of the other split, and
the seam score: the gradient energy across the mask border of the completions over that of the real images at the
same pixels (1: the border is as smooth as in real images; larger: visible seams).

interpolate: per file (keys samples, lambda, labels = class of the first image): the classifier's mean probability
of the first image's class at each lambda (it should fall from lambda = 0 to 1).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import Tensor

from diffusion_pl.cli.errors import user_errors_exit
from diffusion_pl.data import ImageFormat
from diffusion_pl.metrics import (
    ClassifierFeatures,
    RealData,
    domain_reference,
    model_range,
    on_target,
)
from diffusion_pl.metrics.inpainting import seam_energy


def nchw(array: np.ndarray) -> Tensor:
    """An .npz image array (N x H x W x C) as a tensor (N, C, H, W)."""
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def inpaint_rows(extractor: ClassifierFeatures, paths: list[str], data: RealData | None) -> list[str]:
    judge = None if data is None else domain_reference(extractor, data)
    rows = ["| completions | N | accuracy (true class) | accuracy of the originals | domain FID | seam score |",
            "|---|---|---|---|---|---|"]
    num = 0
    for path in paths:
        with np.load(path) as arrays:
            samples, inputs, masks = (nchw(arrays[k]) for k in ("samples", "inputs", "masks"))
            labels = torch.from_numpy(arrays["labels"])
        num = num or len(samples)
        seams = seam_energy(samples, masks)
        real_seams = seam_energy(inputs, masks)
        fid = "" if judge is None else f"{judge.fid(samples):.4g}"
        rows.append(f"| {path} | {len(samples)} | {on_target(extractor.net, samples, labels).share:.4f} | "
                    f"{on_target(extractor.net, inputs, labels).share:.4f} | {fid} | "
                    f"{float(seams.mean() / real_seams.mean()):.3f} |")
    if judge is not None and data is not None:
        rows.append(f"| real {type(data.source).__name__} images (floor) | {num} | | | {judge.floor(num):.4g} | 1 |")
    return rows


@torch.no_grad()
def interpolate_rows(extractor: ClassifierFeatures, paths: list[str]) -> list[str]:
    rows = []
    for path in paths:
        with np.load(path) as arrays:
            samples, lambdas, labels = nchw(arrays["samples"]), arrays["lambda"], arrays["labels"]
        probs = extractor.net(model_range(samples)).softmax(-1)
        p_first = probs[torch.arange(len(labels)), torch.from_numpy(labels)].numpy()
        levels = sorted(set(lambdas.tolist()))
        if not rows:
            rows = ["| interpolations | pairs | " + " | ".join(f"P(class A) at lambda={v:g}" for v in levels) + " |",
                    "|---|---|" + "---|" * len(levels)]
        means = [float(p_first[lambdas == v].mean()) for v in levels]
        rows.append(f"| {path} | {int((lambdas == levels[0]).sum())} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a ClassifierModule checkpoint (clean classifier)")
    parser.add_argument("--fid-source", default=None, help="data source part of the real images (e.g. FashionMNIST, or a YAML spec)")
    parser.add_argument("--fid-split", choices=("train", "test"), default="test")
    parser.add_argument("--resize-mode", choices=("pad", "resize"), default="pad")
    parser.add_argument("kind", choices=("inpaint", "interpolate"))
    parser.add_argument("npz", nargs="+")
    args = parser.parse_args()
    extractor = ClassifierFeatures(args.classifier)
    data = (RealData.from_text(f"{args.fid_source}:{args.fid_split}", ImageFormat(resize_mode=args.resize_mode))
            if args.fid_source else None)
    rows = inpaint_rows(extractor, args.npz, data) if args.kind == "inpaint" else interpolate_rows(extractor, args.npz)
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    with user_errors_exit():
        main()
