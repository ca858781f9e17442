"""Why interpolation noises both images with one shared eps: midpoints with shared against independent noises.

    python3 tools/interpolation_noise.py --model DEMO.ckpt --classifier CLEAN_CLASSIFIER.ckpt [--pairs 250] [--t 0.5]

For --pairs pairs of test images of different classes (--source, default FashionMNIST, at the classifier's size), the lambda = 1/2 midpoint is made by noising
both images to level t, mixing and denoising from t with the model's sampler (diffusion_pl.pipelines.interpolate):
once with the same eps for both (the framework's way: the mixed noise keeps unit variance), once with independent
eps (public code's bug: sqrt(1/4 + 1/4) = 0.71 of the noise is left, so the sampler starts from too clean an image
and the result is too smooth). Prints the measured std of the mixed noise, the domain FID of the midpoints against
the real test images (floor: as many real train images), their mean gradient energy over that of real images
(sharpness; 1 = as sharp as the data) and the clean classifier's mean top probability. Writes a grid
(rows: image A | shared | independent | image B) to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from diffusion_pl.callbacks.images import save_png, uint8_grid
from diffusion_pl.core.tensors import from_uint8, quantized, to_uint8
from diffusion_pl.data import ImageFormat
from diffusion_pl.metrics import ClassifierFeatures, RealData, domain_reference
from diffusion_pl.models import DiffusionModule
from diffusion_pl.pipelines import run_sampler, start_grid
from diffusion_pl.pipelines.model import sampling_process, start_time


def gradient_energy(images: Tensor) -> float:
    """Mean squared difference of horizontally and vertically neighbouring pixels."""
    return float(images.diff(dim=-1).pow(2).mean() + images.diff(dim=-2).pow(2).mean())


@torch.no_grad()
def midpoints(model: DiffusionModule, a: Tensor, b: Tensor, t: float, shared: bool, seed: int) -> tuple[Tensor, float]:
    """The lambda = 1/2 midpoints of pairs (a_i, b_i) and the std of the noise in the mixed start."""
    process = sampling_process(model)
    grid = start_grid(model.sampler.grid(process), t)
    t0 = start_time(grid, a)
    alpha, sigma = process.alpha(t0[:1]).reshape(()), process.sigma(t0[:1]).reshape(())
    generator = torch.Generator().manual_seed(seed)
    eps_a = torch.randn(a.shape, generator=generator)
    eps_b = eps_a if shared else torch.randn(b.shape, generator=generator)
    noise = 0.5 * eps_a + 0.5 * eps_b  # (1 - l) x_t + l x'_t with x_t = alpha a + sigma eps_a, x'_t likewise
    start = alpha * (0.5 * a + 0.5 * b) + sigma * noise  # shared: mix_noised(a, b, 1/2, alpha, sigma, eps_a)
    return run_sampler(model, start, grid=grid, generator=generator), float(noise.std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an unconditional DiffusionModule checkpoint (32x32)")
    parser.add_argument("--classifier", required=True, help="the clean ClassifierModule checkpoint")
    parser.add_argument("--pairs", type=int, default=250)
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--out", default="runs/interpolation_noise")
    parser.add_argument("--source", default="FashionMNIST", help="the data source part of the image pairs and the reference (class path or YAML spec)")
    args = parser.parse_args()
    model = DiffusionModule.load_from_checkpoint(args.model, map_location="cpu").eval()
    extractor = ClassifierFeatures(args.classifier)
    real = RealData.from_text(args.source, ImageFormat())
    judge = domain_reference(extractor, real)
    test = real.at_size(extractor.net.image_size, extractor.net.in_channels).load()
    images = from_uint8(test.images)
    first = torch.arange(0, 2 * args.pairs, 2)
    second = first + 1
    different = test.labels[first] != test.labels[second]
    a, b = images[first[different]], images[second[different]]
    rows = ["| noise | pairs | std of the mixed noise | domain FID | sharpness (real = 1) | top probability |",
            "|---|---|---|---|---|---|"]
    real_energy = gradient_energy(images[: 2 * args.pairs])
    results = {}
    for shared in (True, False):
        out, std = midpoints(model, a, b, args.t, shared, seed=0)
        out = quantized(out)
        results[shared] = out
        top = float(extractor.net(out).softmax(-1).max(-1).values.mean())
        rows.append(f"| {'shared' if shared else 'independent'} | {len(a)} | {std:.3f} | {judge.fid(out):.4g} | "
                    f"{gradient_energy(out) / real_energy:.3f} | {top:.3f} |")
    rows.append(f"| real train images (floor) | {len(a)} | | {judge.floor(len(a)):.4g} | 1 | |")
    count = min(8, len(a))
    grid = torch.stack([a[:count], results[True][:count], results[False][:count], b[:count]], dim=1).flatten(0, 1)
    path = save_png(uint8_grid(to_uint8(grid), nrow=4), Path(args.out) / "shared_vs_independent.png")
    sys.stdout.write("\n".join(rows) + f"\n\nGrid (A | shared | independent | B): {path}\n")


if __name__ == "__main__":
    main()
