"""Scores of inpainting and interpolation outputs of `diffusion-pl predict` (overlays/inpaint.yaml, interpolate.yaml).

    python3 tools/pipeline_report.py --classifier CLEAN_CLASSIFIER.ckpt --fid-source diffusion_pl.data.FashionMNIST \
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
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sample_accuracy import frechet_distance, target_accuracy, to_model_range  # noqa: E402

from diffusion_pl.data import ImageFormat  # noqa: E402
from diffusion_pl.data.sources import source_from_text  # noqa: E402
from diffusion_pl.metrics import ClassifierFeatures, reference_statistics  # noqa: E402
from diffusion_pl.metrics.inpainting import seam_energy  # noqa: E402


def inpaint_rows(extractor: ClassifierFeatures, paths: list[str], source: str | None, split: str,
                 resize_mode: str) -> list[str]:
    net = extractor.net
    reference = floor = None
    if source:
        image_format = ImageFormat(net.image_size, net.in_channels, resize_mode)
        real = source_from_text(source).load(split, image_format)
        reference = reference_statistics(to_model_range(real.images).split(500), extractor, len(real),
                                         kid_size=len(real))
        other = source_from_text(source).load("train" if split == "test" else "test", image_format)
    rows = ["| completions | N | accuracy (true class) | accuracy of the originals | domain FID | seam score |",
            "|---|---|---|---|---|---|"]
    for path in paths:
        with np.load(path) as arrays:
            samples, inputs, masks, labels = (arrays[k] for k in ("samples", "inputs", "masks", "labels"))
        accuracy, _ = target_accuracy(net, samples, labels)
        original, _ = target_accuracy(net, inputs, labels)
        mask = torch.from_numpy(masks).permute(0, 3, 1, 2)
        seams = seam_energy(torch.from_numpy(samples).permute(0, 3, 1, 2), mask)
        real_seams = seam_energy(torch.from_numpy(inputs).permute(0, 3, 1, 2), mask)
        fid = "" if reference is None else f"{frechet_distance(extractor, reference, to_model_range(samples)):.4g}"
        rows.append(f"| {path} | {len(samples)} | {accuracy:.4f} | {original:.4f} | {fid} | "
                    f"{float(seams.mean() / real_seams.mean()):.3f} |")
        if reference is not None and floor is None:
            floor = frechet_distance(extractor, reference, to_model_range(other.images[: len(samples)]))
    if floor is not None:
        rows.append(f"| real {source} images (floor) | {len(samples)} | | | {floor:.4g} | 1 |")
    return rows


@torch.no_grad()
def interpolate_rows(extractor: ClassifierFeatures, paths: list[str]) -> list[str]:
    rows = []
    for path in paths:
        with np.load(path) as arrays:
            samples, lambdas, labels = arrays["samples"], arrays["lambda"], arrays["labels"]
        probs = extractor.net(to_model_range(samples)).softmax(-1)
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
    parser.add_argument("--fid-source", default=None,
                        help="source part of the real images (e.g. diffusion_pl.data.FashionMNIST)")
    parser.add_argument("--fid-split", choices=("train", "test"), default="test")
    parser.add_argument("--resize-mode", choices=("pad", "resize"), default="pad")
    parser.add_argument("kind", choices=("inpaint", "interpolate"))
    parser.add_argument("npz", nargs="+")
    args = parser.parse_args()
    extractor = ClassifierFeatures(args.classifier)
    rows = (inpaint_rows(extractor, args.npz, args.fid_source, args.fid_split, args.resize_mode)
            if args.kind == "inpaint" else interpolate_rows(extractor, args.npz))
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
