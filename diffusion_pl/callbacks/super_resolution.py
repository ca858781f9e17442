"""PSNR and consistency of a super-resolution stage's samples, logged at every validation."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from diffusion_pl.callbacks.ema import averaged_module
from diffusion_pl.callbacks.examples import real_examples
from diffusion_pl.core.resize import DownsampleMode
from diffusion_pl.metrics.super_resolution import consistency_error, psnr


class SuperResolutionMetrics(pl.Callback):
    """After each validation, super-resolve the low-res versions of the first ``num_images`` validation images (the
    model's own sampler, EMA weights, a fixed seed) and log ``val/sr_psnr`` (dB, against the real high-res images)
    and ``val/sr_consistency`` (RMS of down(SR) - x_low, [-1, 1] units).

    The model follows the sampling protocol: ``example_batch(n, real=...)`` gives each image's ``low_res`` input.

    Args:
        num_images: Validation images super-resolved each time.
        seed: Seed of the samples.
        downsample_mode: How an SR output is reduced for the consistency check (the stage's ``downsample_mode``).
    """

    def __init__(self, num_images: int = 64, seed: int = 0, downsample_mode: DownsampleMode = "area") -> None:
        self.num_images, self.seed, self.downsample_mode = num_images, seed, downsample_mode

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        real = real_examples(trainer, self.num_images)
        if real is None:
            return
        module = averaged_module(trainer, pl_module)
        was_training = module.training
        module.eval()
        batch = module.example_batch(len(real), real=real)
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        images = module.sample(len(real), batch=batch, generator=generator)
        module.train(was_training)
        low = batch["low_res"]
        factor = images.shape[-1] // low.shape[-1]
        values = {"val/sr_psnr": psnr(images, real.to(images)).mean(),
                  "val/sr_consistency": consistency_error(images, low, factor, self.downsample_mode).mean()}
        for name, value in values.items():
            pl_module.log(name, value.float(), batch_size=len(real))
