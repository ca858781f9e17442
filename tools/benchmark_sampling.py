"""Benchmark: seconds per image of each sampler for a trained checkpoint, through `diffusion-pl predict`.

    python3 tools/benchmark_sampling.py --config configs/sde/vp_fashion_mnist.yaml --ckpt_path CKPT \
        --sampler EulerMaruyama:1000 --sampler PredictorCorrector:1000 --num-images 64

Each ``--sampler NAME[:STEPS]`` (NAME a sampler class of :mod:`diffusion_pl.samplers`: DDPM, DDIM, EulerMaruyama,
PredictorCorrector, ODE; STEPS its ``steps``) runs once as a warm-up on one batch, then predicts ``--num-images``
images; the table gives the wall time of the second run divided by the number of images, with the grid it wrote.
Other arguments are passed to the CLI (``--model.init_args.sampler.init_args.snr=0.1``,
``--trainer.accelerator=gpu``, ...).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from diffusion_pl.callbacks import SampleWriter
from diffusion_pl.cli import build_cli


def predict_seconds(config: str, ckpt_path: str, sampler: str, steps: str | None, num_images: int,
                    output_dir: Path, extra: list[str]) -> float:
    """Wall-clock seconds of `predict` for ``num_images`` images with ``sampler`` (``steps`` or its default)."""
    args = ["--config", config, f"--model.init_args.sampler=diffusion_pl.samplers.{sampler}",
            f"--data.init_args.predict.num={num_images}", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={output_dir}", *extra]
    if steps is not None:
        args.append(f"--model.init_args.sampler.init_args.steps={steps}")
    cli = build_cli(args, run=False)
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, SampleWriter))
    writer.output_dir = str(output_dir)
    start = time.perf_counter()
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, return_predictions=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--sampler", action="append", required=True, help="NAME or NAME:STEPS (repeatable)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--output-dir", default=None, help="where the grids go (default: a temporary folder)")
    args, overrides = parser.parse_known_args()  # the rest are CLI overrides, e.g. --trainer.accelerator=gpu
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="benchmark_sampling_"))
    rows = []
    for spec in args.sampler:
        name, _, steps = spec.partition(":")
        out = root / spec.replace(":", "_")
        batch = [f"--data.init_args.predict.batch_size={args.num_images}", *overrides]
        predict_seconds(args.config, args.ckpt_path, name, steps or None, 2, out / "warmup", batch)
        seconds = predict_seconds(args.config, args.ckpt_path, name, steps or None, args.num_images, out, batch)
        rows.append(f"| {spec} | {args.num_images} | {seconds:.1f} | {seconds / args.num_images:.3f} | {out}/grid.png |")
    sys.stdout.write("| sampler | images | seconds | s/image | grid |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
