"""Samplers at a budget of network evaluations: the same seeds through each sampler at each budget, timed.

    python3 tools/sampler_steps.py --ckpt runs/ddpm_fashion_mnist/lightning_logs/version_0/checkpoints/last.ckpt \
        --sampler DDIM --sampler DPMSolverPP --sampler Heun --evals 5,10,20,50 --num 1000 --out runs/sampler_steps

For each sampler (a class of :mod:`diffusion_pl.samplers` with a ``steps`` argument; ``NAME:rho=7,sigma_max=80``
gives its spacing a ``Karras`` grid with those arguments) and each budget E, the number of steps that spends E
network evaluations (Heun: (E + 1) / 2 steps, 2N - 1 evaluations; the others: E) samples images from seeds
0..num-1 (each image's noise from its own seed, so every cell starts from the same noise). Writes
``<sampler>_<E>.npz`` (``samples``, uint8 N x H x W x C, what tools/sample_accuracy.py scores), ``grid.png`` (a row
per sampler and budget, the first ``--grid-seeds`` seeds), and prints seconds per image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusion_pl import samplers
from diffusion_pl.callbacks.images import save_npz, save_png, uint8_grid
from diffusion_pl.core.tensors import to_uint8
from diffusion_pl.models import DiffusionModule
from diffusion_pl.pipelines.model import seeded_noise

#: Samplers whose step costs two evaluations but the last (Heun's second-order correction).
TWO_EVALUATIONS_PER_STEP = {"Heun", "EDMStochastic"}


def sampler_for_budget(spec: str, evaluations: int) -> samplers.Sampler:
    """The sampler part of ``spec`` (``NAME`` or ``NAME:key=value,...`` for a Karras spacing) spending
    ``evaluations`` network evaluations."""
    name, _, grid_args = spec.partition(":")
    steps = (evaluations + 1) // 2 if name in TWO_EVALUATIONS_PER_STEP else evaluations
    kwargs = {}
    if grid_args:
        kwargs["spacing"] = samplers.Karras(**{k: float(v) for k, v in (a.split("=") for a in grid_args.split(","))})
    return getattr(samplers, name)(steps=steps, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a DiffusionModule checkpoint")
    parser.add_argument("--sampler", action="append", required=True, help="NAME or NAME:rho=7,sigma_max=80")
    parser.add_argument("--evals", default="5,10,20,50", help="budgets of network evaluations, comma-separated")
    parser.add_argument("--num", type=int, default=1000, help="images per sampler and budget (seeds 0..num-1)")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--grid-seeds", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_grad_enabled(False)
    model = DiffusionModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    rows = []
    print("| sampler | evaluations | steps | s/image |\n|---|---|---|---|")
    for spec in args.sampler:
        for evaluations in (int(e) for e in args.evals.split(",")):
            model.sampler = sampler_for_budget(spec, evaluations)
            model.sampler.check(model.process)
            images, start = [], time.perf_counter()
            for first in range(0, args.num, args.batch):
                seeds = list(range(first, min(first + args.batch, args.num)))
                noise = seeded_noise(model.process, model.latent_shape, seeds)
                images.append(to_uint8(model.sample(noise=noise, generator=torch.Generator().manual_seed(first))))
            seconds = (time.perf_counter() - start) / args.num
            samples = torch.cat(images)
            name = spec.replace(":", "_").replace(",", "_").replace("=", "")
            save_npz(samples, out / f"{name}_{evaluations}.npz")
            rows.append(samples[: args.grid_seeds])
            print(f"| {spec} | {evaluations} | {model.sampler.steps} | {seconds:.4f} |", flush=True)
    save_png(uint8_grid(torch.cat(rows), nrow=args.grid_seeds), out / "grid.png")


if __name__ == "__main__":
    main()
