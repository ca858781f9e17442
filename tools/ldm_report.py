"""The measurements of latent diffusion on Fashion-MNIST, as Markdown tables.

    python3 tools/ldm_report.py --classifier CLEAN_CLASSIFIER.ckpt --autoencoder AUTOENCODER.ckpt \
        --model NAME=LATENT_OR_PIXEL_MODEL.ckpt [--model ...] [--num 1000] [--steps 50] [--out runs/ldm_report]

1. The autoencoder on the whole test set: PSNR and L1 of the reconstructions (posterior mean), and, for each latent
   model, the mean and standard deviation of its scaled latents s E(x) of the test images (s estimated over training
   images when the model was fitted: the std should be close to 1).
2. Every --model (latent or pixel, e.g. the pixel demo beside the LDMs): --num samples from seeds 0 .. num - 1 with
   DDIM (--steps), the sampling seconds per image, the domain FID (the clean classifier's features, the test set as
   reference; the floor from as many real train images) and, for a conditional model, the share of samples the clean
   classifier puts in the target class. Targets cycle through the classes: labels for a class-conditional model,
   "a photo of a {class}" for a text-conditional one. The classifier is trained separately (configs/classifier).
3. A grid of each model's first 100 samples (10 per class for conditional models): <out>/<name>_grid.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.callbacks.images import save_png, uint8_grid
from diffusion_pl.conditioning import ClassLabel, Text
from diffusion_pl.core.report import MarkdownReport
from diffusion_pl.core.tensors import from_uint8, quantized, to_uint8
from diffusion_pl.data import ImageFormat
from diffusion_pl.metrics import (
    ClassifierFeatures,
    RealData,
    domain_reference,
    on_target,
    psnr,
)
from diffusion_pl.models import DiffusionModule
from diffusion_pl.nets.autoencoder import KLAutoencoder
from diffusion_pl.nets.first_stage import Autoencoder
from diffusion_pl.nets.loading import load_checkpoint, rebuild
from diffusion_pl.pipelines import sample_seeds
from diffusion_pl.samplers import DDIM

PROMPT = "a photo of a {}"


def targets(model: DiffusionModule, num: int, class_names: list[str]) -> tuple[dict[str, Any], Tensor | None]:
    """The conditions of ``num`` samples (classes cycled) and their target classes (None: unconditional)."""
    labels = torch.arange(num) % len(class_names)
    if isinstance(model.conditioner, ClassLabel):  # ClassLabel and ClassContext
        return {"label": labels}, labels
    if isinstance(model.conditioner, Text):
        return {"prompt": [PROMPT.format(class_names[i]) for i in labels.tolist()]}, labels
    return {}, None


@torch.no_grad()
def autoencoder_rows(path: str, images: Tensor, models: dict[str, DiffusionModule]) -> list[str]:
    net: KLAutoencoder = rebuild(load_checkpoint(path), "net", "autoencoder.", path)
    reconstructions = torch.cat([net(batch, sample_posterior=False)[0].clamp(-1, 1) for batch in images.split(500)])
    reconstructions = quantized(reconstructions)
    rows = ["## 1. Autoencoder (test set)", "", "| | value |", "|---|---|",
            f"| PSNR (dB) | {float(psnr(reconstructions, images).mean()):.2f} |",
            f"| L1 ([-1, 1] pixels) | {float((reconstructions - images).abs().mean()):.4f} |"]
    for name, model in models.items():
        if isinstance(model.first_stage, Autoencoder):
            torch.manual_seed(0)
            latents = torch.cat([model.first_stage.encode(batch) for batch in images.split(500)])
            rows.append(f"| {name}: scale s = {model.first_stage.scale.item():.4f}, scaled test latents mean / std | "
                        f"{latents.mean().item():.3f} / {latents.std().item():.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a ClassifierModule checkpoint (the clean classifier)")
    parser.add_argument("--autoencoder", default=None, help="the AutoencoderModule checkpoint of the latent models")
    parser.add_argument("--model", action="append", required=True, type=lambda text: text.split("=", 1),
                        help="NAME=CHECKPOINT of a DiffusionModule (repeatable)")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="runs/ldm_report")
    parser.add_argument("--source", default="FashionMNIST", help="a data source part: a class path (FashionMNIST, diffusion_pl.data.Torchvision) or a YAML spec")
    args = parser.parse_args()
    out = Path(args.out)
    lines = MarkdownReport(out / "report.md", sys.stdout)
    extractor = ClassifierFeatures(args.classifier)
    real = RealData.from_text(args.source, ImageFormat())
    test = real.at_size(extractor.net.image_size, extractor.net.in_channels).load()
    real = from_uint8(test.images)
    models = {name: DiffusionModule.load_from_checkpoint(path, map_location="cpu", sampler=DDIM(steps=args.steps)).eval()
              for name, path in args.model}
    if args.autoencoder:
        lines.extend(autoencoder_rows(args.autoencoder, real, models))

    judge = domain_reference(extractor, real)
    lines.extend(["", f"## 2. Samples ({args.num} per model, DDIM-{args.steps})", "",
                  "| model | domain FID | on target (clean classifier) | sampling s/image |", "|---|---|---|---|"])
    for name, model in models.items():
        conditions, labels = targets(model, args.num, test.class_names)
        images, seconds = sample_seeds(model, args.num, args.batch_size, conditions)
        images = quantized(images)
        share = "-" if labels is None else f"{on_target(extractor.net, images, labels).share:.1%}"
        lines.append(f"| {name} | {judge.fid(images):.4g} | {share} | {seconds:.4f} |")
        order = torch.argsort(labels[:100], stable=True) if labels is not None else torch.arange(min(100, args.num))
        save_png(uint8_grid(to_uint8(images[:100][order]), nrow=10), out / f"{name}_grid.png")
    lines.append(f"| real train images (floor) | {judge.floor(args.num):.4g} | | |")


if __name__ == "__main__":
    main()
