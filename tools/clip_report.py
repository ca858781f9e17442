"""Measurements of CLIP models and CLIP-guided samples (the README's CLIP table).

Zero-shot accuracy of CLIPModule checkpoints on a split, clean and on x_t of the Fashion-MNIST DDPMs' process
(cosine, T = 1000) at several steps t (a noised CLIP gets t; a clean one sees x_t as if it were clean):

    python3 tools/clip_report.py zero-shot --steps 0,100,300,500,700,900 \
        runs/clip_fashion_mnist/lightning_logs/version_0/checkpoints/last.ckpt \
        runs/clip_fashion_mnist_noised/lightning_logs/version_0/checkpoints/last.ckpt

CLIP score of prompted samples (``samples.npz`` with ``prompts``, as CLIP-guided or text-conditional predict writes)
under an evaluator CLIP (train a second one with another seed, so that the score is not the guide's own): the mean
cosine between each sample and its prompt, and the evaluator's zero-shot accuracy on the class its prompt names (a
file without prompts, e.g. unguided, is scored against the class prompts cycled); also writes one grid per prompt
beside each .npz (``grid_prompt{k}.png``, k the prompt's class):

    python3 tools/clip_report.py samples --clip runs/clip_fashion_mnist_seed1/.../last.ckpt runs/.../samples.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from diffusion_pl.callbacks.images import save_png, uint8_grid
from diffusion_pl.cli.errors import user_errors_exit
from diffusion_pl.core.tensors import from_uint8
from diffusion_pl.data import ImageFormat
from diffusion_pl.data.image_files import read_image_files
from diffusion_pl.metrics import RealData
from diffusion_pl.metrics.clip_score import clip_score
from diffusion_pl.metrics.features import model_range
from diffusion_pl.nets.clip import CLASS_NAMES_KEY, CLIPNet, read_clip
from diffusion_pl.processes import DiscreteProcess

TEMPLATE = "a photo of a {}"


def class_prompts(entries: dict, path: str) -> list[str]:
    """"a photo of a {class}" for the classes a CLIPModule checkpoint names."""
    names = entries.get(CLASS_NAMES_KEY)
    if not names:
        raise SystemExit(f"{path} names no classes: give a CLIPModule checkpoint")
    return [TEMPLATE.format(name) for name in names]


@torch.no_grad()
def zero_shot(net: CLIPNet, prompts: list[str], images: Tensor, labels: Tensor, process: DiscreteProcess, step: int,
              batch_size: int = 500) -> float:
    """Zero-shot accuracy on ``images`` (float, [-1, 1]) noised to x_t at ``step`` (0: clean), fixed noise seed."""
    text = net.encode_text(prompts)
    generator = torch.Generator().manual_seed(step)
    correct = 0
    for x0, y in zip(images.split(batch_size), labels.split(batch_size)):
        t = torch.full((len(x0),), step, dtype=torch.long)
        x = x0 if step == 0 else process.add_noise(x0, t, torch.randn(x0.shape, generator=generator))
        time = process.net_input_time(t) if net.time_conditional else None
        correct += int((net.similarity(net.encode_image(x, time), text).argmax(-1) == y).sum())
    return correct / len(images)


def run_zero_shot(args: argparse.Namespace) -> list[str]:
    process = DiscreteProcess(1000, "cosine")
    steps = [int(s) for s in args.steps.split(",")]
    data = RealData.from_text(f"{args.source}:{args.split}", ImageFormat(32, 1, "pad")).load()
    images, labels = from_uint8(data.images), data.labels
    fractions = [0.0 if s == 0 else float(process.sigma(torch.tensor([s])) ** 2) for s in steps]
    rows = ["| CLIP | " + " | ".join(f"t={s} ({f:.2f})" for s, f in zip(steps, fractions)) + " |",
            "|---" * (len(steps) + 1) + "|"]
    for path in args.clip:
        net, entries = read_clip(path)
        prompts = class_prompts(entries, path)
        accuracy = [zero_shot(net, prompts, images, labels, process, s) for s in steps]
        rows.append(f"| {path} | " + " | ".join(f"{a:.3f}" for a in accuracy) + " |")
    return rows


@torch.no_grad()
def run_samples(args: argparse.Namespace) -> list[str]:
    net, entries = read_clip(args.clip)
    prompts = class_prompts(entries, args.clip)
    class_text = net.encode_text(prompts)
    rows = ["| samples | N | CLIP score (cos) | evaluator zero-shot on prompted class |", "|---|---|---|---|"]
    for path in args.npz:
        files = read_image_files(path, "samples")
        # An unguided run writes no prompts: score it against the class prompts cycled, as the predict prompts were.
        sample_prompts = (list(files.prompts) if files.prompts is not None
                          else [prompts[i % len(prompts)] for i in range(len(files.images))])
        targets = torch.tensor([prompts.index(p) for p in sample_prompts])
        predicted = net.similarity(net.encode_image(model_range(files.images)), class_text).argmax(-1)
        accuracy = (predicted == targets).float().mean()
        rows.append(f"| {path} | {len(files.images)} | {clip_score(net, files.images, sample_prompts):.3f} | "
                    f"{float(accuracy):.3f} |")
        for k in targets.unique().tolist():
            save_png(uint8_grid(files.images[targets == k]), Path(path).parent / f"grid_prompt{k}.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    zs = commands.add_parser("zero-shot", help="zero-shot accuracy, clean and on x_t")
    zs.add_argument("--steps", default="0,100,300,500,700,900", help="diffusion steps t (0: clean images)")
    zs.add_argument("--source", default="FashionMNIST", help="a data source part: a class path (FashionMNIST, diffusion_pl.data.Torchvision) or a YAML spec")
    zs.add_argument("--split", default="test", choices=("train", "test"))
    zs.add_argument("clip", nargs="+", help="CLIPModule checkpoints")
    sp = commands.add_parser("samples", help="CLIP score of prompted samples under an evaluator CLIP")
    sp.add_argument("--clip", required=True, help="the evaluator's CLIPModule checkpoint")
    sp.add_argument("npz", nargs="+")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = run_zero_shot(args) if args.command == "zero-shot" else run_samples(args)
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    with user_errors_exit():
        main()
