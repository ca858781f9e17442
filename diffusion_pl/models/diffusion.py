"""DiffusionModule: wires a network, a forward process, a loss and a sampler into Lightning."""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from diffusion_pl.losses import SimpleLoss
from diffusion_pl.models.lr_schedule import Decay, warmup_multiplier
from diffusion_pl.parameterization import Denoiser, DenoiseFn, PredictionKind, clip_denoised
from diffusion_pl.processes.discrete import DiscreteProcess
from diffusion_pl.samplers import sample_ddim, sample_ddpm
from diffusion_pl.samplers.ddpm import FixedVariance
from diffusion_pl.utils import to_uint8

SamplerName = Literal["ddpm", "ddim"]
log = logging.getLogger(__name__)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam with lr 2e-4 (Ho et al. 2020, App. B)."""
    return torch.optim.Adam(params, lr=2e-4)


class DiffusionModule(pl.LightningModule):
    """A denoising diffusion model (Ho et al. 2020) trained with a denoising loss and sampled by a sampler function.

    Args:
        net: The network, called as ``net(x_t, t_embed)``.
        process: The forward process.
        prediction: What the network predicts: "eps", "x0" or "v".
        loss: Training loss (defaults to L_simple).
        optimizer: Optimizer factory (defaults to Adam, lr 2e-4).
        warmup_steps: Linear learning-rate warm-up, in optimizer steps.
        lr_decay: "constant" after warm-up, or "cosine" decay to 0 at the trainer's max_steps.
        image_size: Side of the square images (linked from the data config).
        channels: Image channels (linked from the data config).
        sampler: Sampler used by ``sample``/``predict``: "ddpm" (ancestral) or "ddim".
        sample_steps: Steps of the DDIM sampler (the DDPM sampler always runs all T steps).
        eta: DDIM stochasticity in [0, 1].
        ddpm_variance: Fixed reverse variance of the DDPM sampler: "beta" or "posterior".
        clip_samples: Clamp the predicted x0 to [-1, 1] at every sampling step.
    """

    def __init__(
        self,
        net: nn.Module,
        process: DiscreteProcess,
        prediction: PredictionKind = "eps",
        loss: SimpleLoss | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        warmup_steps: int = 0,
        lr_decay: Decay = "constant",
        image_size: int = 32,
        channels: int = 3,
        sampler: SamplerName = "ddpm",
        sample_steps: int = 100,
        eta: float = 0.0,
        ddpm_variance: FixedVariance = "beta",
        clip_samples: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "process", "loss"])
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
        self.denoiser = Denoiser(net, process, prediction)
        self.loss_fn = loss if loss is not None else SimpleLoss()
        self.optimizer_factory = optimizer

    @property
    def process(self) -> DiscreteProcess:
        return self.denoiser.process

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments the network receives besides (x_t, t); none for an unconditional model."""
        return {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.denoiser, batch["image"], **self.conditioning(batch)).mean()
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self._fixed_noise_loss(batch, batch_idx), sync_dist=True,
                 batch_size=batch["image"].shape[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("test/loss", self._fixed_noise_loss(batch, batch_idx), sync_dist=True,
                 batch_size=batch["image"].shape[0])

    def _fixed_noise_loss(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Loss with (t, eps) drawn from a generator seeded by the batch index: comparable across evaluations
        and free of side effects on the global RNG (which keeps resumed training exact)."""
        generator = torch.Generator(device=self.device).manual_seed(batch_idx + 1000 * self.global_rank)
        return self.loss_fn(self.denoiser, batch["image"], generator=generator, **self.conditioning(batch)).mean()

    def _check_finite(self, loss: Tensor) -> None:
        """Fail fast on a NaN/inf loss, checked at logging steps only (a host sync every step would slow GPUs)."""
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0 and not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step}: lower the learning rate "
                "(model.optimizer.init_args.lr), set trainer.gradient_clip_val (e.g. 1.0), add warm-up "
                "(model.warmup_steps), or use bf16-mixed instead of 16-mixed precision")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameters())
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        multiplier = functools.partial(warmup_multiplier, warmup_steps=self.hparams.warmup_steps,
                                       decay=self.hparams.lr_decay, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def sampling_denoiser(self, **cond: Any) -> DenoiseFn:
        """The denoiser the samplers call, with conditioning bound and optional x0 clipping."""
        denoise = self.denoiser.bind(**cond)
        return clip_denoised(denoise, self.process) if self.hparams.clip_samples else denoise

    @torch.no_grad()
    def sample(self, num_samples: int | None = None, *, noise: Tensor | None = None,
               generator: torch.Generator | None = None, progress: bool = False, **cond: Any) -> Tensor:
        """Generate images in [-1, 1] with the configured sampler, from ``noise`` or fresh prior noise."""
        if noise is None:
            if num_samples is None:
                raise ValueError("sample() needs num_samples or noise")
            noise = self.process.prior_sample((num_samples, *self.image_shape), generator=generator,
                                              device=self.device)
        denoise = self.sampling_denoiser(**cond)
        if self.hparams.sampler == "ddpm":
            return sample_ddpm(denoise, self.process, noise, variance=self.hparams.ddpm_variance,
                               generator=generator, progress=progress)
        return sample_ddim(denoise, self.process, noise, steps=self.hparams.sample_steps, eta=self.hparams.eta,
                           generator=generator, progress=progress)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Sample one image per seed in ``batch["seed"]``; returns uint8 images (B, C, H, W) on the CPU.

        Each image's prior noise comes from its own seed on the CPU, so an image depends only on its seed,
        not on the batch size, the device count or the device type.
        """
        seeds = batch["seed"].tolist()
        noise = torch.stack([torch.randn(self.image_shape, generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(int(seeds[0]) * 7919 + 1)
        return to_uint8(self.sample(noise=noise, generator=generator)).cpu()

    def on_fit_start(self) -> None:
        """Log the effective batch size and learning rate so runs compare (DDP multiplies the batch)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if per_device is None or self.logger is None:
            return
        effective = per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches
        group = self.trainer.optimizers[0].param_groups[0]
        lr = group.get("initial_lr", group["lr"])
        num_parameters = sum(p.numel() for p in self.denoiser.parameters())
        log.info("effective batch size %d (%d per device x %d devices x %d accumulation), base lr %g, %d parameters",
                 effective, per_device, self.trainer.world_size, self.trainer.accumulate_grad_batches, lr,
                 num_parameters)
        self.logger.log_hyperparams({"effective_batch_size": effective, "base_lr": lr,
                                     "num_parameters": num_parameters})
