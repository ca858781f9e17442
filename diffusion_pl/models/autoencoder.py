"""AutoencoderModule: trains the KL autoencoder that latent diffusion runs in (Rombach et al. 2022, Sec. 3)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from diffusion_pl.core.spec import build, is_spec
from diffusion_pl.metrics.super_resolution import psnr
from diffusion_pl.models.base import PartsModule, configure_optimization
from diffusion_pl.nets.autoencoder import (
    DiscLoss,
    KLAutoencoder,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam with lr 1e-3 and betas (0.5, 0.9) (LDM's autoencoder betas; a learning rate for small models)."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9))


def autoencoder_steps(global_step: int, disc_start: int) -> int:
    """The autoencoder's optimizer steps among ``global_step`` steps of both optimizers, when the discriminator takes
    one step per batch from autoencoder step ``disc_start`` on: g = a before, g = a + (a - disc_start) after."""
    return global_step if global_step <= disc_start else (global_step + disc_start) // 2


class AutoencoderModule(PartsModule):
    """Trains a :class:`KLAutoencoder` with, per batch of images x (Rombach et al. 2022, Sec. 3 and App. G, without
    LPIPS),

        L = mean|x - x_hat| + l2_weight mean (x - x_hat)^2 + kl_weight KL + lambda L_GAN,

    the pixel means taken over batch, channels and pixels, KL = KL(q(z|x) || N(0, I)) summed over the latent's
    dimensions and averaged over the batch (so kl_weight here is LDM's weight divided by C H W, LDM summing the
    pixel loss over pixels), x_hat decoded from a posterior sample. With a ``discriminator``, from autoencoder step
    ``disc_start`` on L_GAN = -mean D(x_hat) with the adaptive weight lambda = ``disc_weight`` * ||grad L_rec|| /
    (||grad L_GAN|| + 1e-4) at the decoder's last layer (:func:`~diffusion_pl.nets.autoencoder.adaptive_weight`), and
    each batch takes an autoencoder step, then a discriminator step on ``disc_loss``; before ``disc_start`` the
    adversarial term is off and the discriminator is not updated.

    With a discriminator the module optimises manually (two optimizers), and Lightning's ``trainer.global_step`` (so
    ``trainer.max_steps`` and every step-based callback interval) counts the steps of both: one per batch before
    ``disc_start``, two per batch after (so a run may stop one step past an odd ``max_steps``). ``disc_start`` counts
    autoencoder steps (batches trained), see :attr:`autoencoder_steps`. Lightning refuses ``trainer.gradient_clip_val``
    under manual optimisation: set ``gradient_clip_val`` here instead (applied to each optimizer); without a
    discriminator use the trainer's.

    Validation and test reconstruct from the posterior mode and log ``{val,test}/ae_l1`` (mean |x - x_hat|),
    ``/ae_psnr`` (dB, images in [-1, 1] clamped, i.e. PSNR of [0, 1] images), ``/kl`` and ``/loss`` (L without the
    adversarial term).

    Args:
        net: The autoencoder.
        discriminator: A patch discriminator for the adversarial term, or None.
        kl_weight: beta_KL, the weight of the per-sample KL.
        l2_weight: Weight of the mean squared error added to the L1 loss.
        disc_start: Autoencoder step at which the adversarial term and discriminator updates begin.
        disc_weight: Factor of the adaptive weight.
        disc_loss: The discriminator's loss, "hinge" or "vanilla".
        optimizer: Optimizer factory, used for the autoencoder and the discriminator (default Adam, lr 1e-3, betas
            (0.5, 0.9)).
        lr_scheduler: Learning-rate schedule factory, one schedule per optimizer, each stepped with its optimizer.
        gradient_clip_val: With a discriminator, clip each optimizer's gradients at this value (None: no clipping).
        gradient_clip_algorithm: "norm" or "value", with ``gradient_clip_val``.
        image_size: Side of the data's images (linked from the data config; must be divisible by the net's factor).
        channels: Channels of the data's images (linked from the data config; must be the net's ``in_channels``).
    """

    #: What the weights mean: a checkpoint of another net or discriminator is refused (``CheckpointChecks``).
    MUST_MATCH = ("net", "discriminator", "channels")
    RUN_METRICS = ("val/ae_psnr", "val/ae_l1")

    def __init__(
        self,
        net: KLAutoencoder,
        discriminator: PatchDiscriminator | None = None,
        kl_weight: float = 1e-6,
        l2_weight: float = 0.0,
        disc_start: int = 0,
        disc_weight: float = 0.5,
        disc_loss: DiscLoss = "hinge",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        image_size: int = 32,
        channels: int = 3,
    ) -> None:
        super().__init__()
        if is_spec(net) or is_spec(discriminator):  # the specs a checkpoint stores: load_from_checkpoint
            net, discriminator = build(net, "the net argument"), build(discriminator, "the discriminator argument")
        if net.in_channels != channels:
            raise ValueError(f"the autoencoder takes {net.in_channels}-channel images but the data has {channels}: set "
                             "model.init_args.net.init_args.in_channels to data.init_args.image_format.channels")
        net.latent_shape((channels, image_size, image_size))  # raises for sides the net cannot downsample
        if discriminator is not None and discriminator.layers[0].in_channels != channels:
            raise ValueError(f"the discriminator takes {discriminator.layers[0].in_channels}-channel images but the "
                             f"data has {channels}: set model.init_args.discriminator.init_args.in_channels")
        if disc_loss not in ("hinge", "vanilla") or min(kl_weight, l2_weight, disc_weight, disc_start) < 0:
            raise ValueError(f"need disc_loss 'hinge' or 'vanilla' and non-negative weights and disc_start, got "
                             f"disc_loss={disc_loss!r}, kl_weight={kl_weight}, l2_weight={l2_weight}, "
                             f"disc_weight={disc_weight}, disc_start={disc_start}")
        if gradient_clip_val is not None and discriminator is None:
            raise ValueError("gradient_clip_val of the module applies under manual optimisation (with a "
                             "discriminator); without one set trainer.gradient_clip_val instead")
        self.register_parts({"net": net, "discriminator": discriminator}, optimizer, lr_scheduler)
        self.autoencoder = net
        self.discriminator = discriminator
        self.automatic_optimization = discriminator is None

    @property
    def trained(self) -> nn.Module:
        return self.autoencoder

    @property
    def autoencoder_steps(self) -> int:
        """Optimizer steps the autoencoder has taken (``global_step`` without the discriminator's)."""
        if self.discriminator is None:
            return self.global_step
        return autoencoder_steps(self.global_step, self.hparams.disc_start)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Decode the posterior mode of ``images`` (B, C, H, W) in [-1, 1]: the reconstructions grids show."""
        return self.autoencoder(images, sample_posterior=False)[0]

    # ------------------------------------------------------------------------------------------- steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]
        reconstruction, posterior = self.autoencoder(x)
        rec_loss = reconstruction_loss(reconstruction, x, self.hparams.l2_weight)
        kl = posterior.kl().mean()
        loss = rec_loss + self.hparams.kl_weight * kl
        size = x.shape[0]
        self.log_dict({"train/rec_loss": rec_loss.detach(), "train/kl": kl.detach()}, batch_size=size)
        if self.discriminator is None:
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
            return loss
        return self._adversarial_steps(x, reconstruction, rec_loss, loss)

    def _adversarial_steps(self, x: Tensor, reconstruction: Tensor, rec_loss: Tensor, loss: Tensor) -> Tensor:
        """The autoencoder's step on ``loss`` (+ lambda L_GAN once the discriminator is on), then the
        discriminator's."""
        ae_optimizer, disc_optimizer = self.optimizers()
        ae_scheduler, disc_scheduler = self.lr_schedulers() or (None, None)
        size = x.shape[0]
        disc_on = self.autoencoder_steps >= self.hparams.disc_start
        if disc_on:
            g_loss = generator_loss(self.discriminator(reconstruction))
            weight = self.hparams.disc_weight * adaptive_weight(rec_loss, g_loss, self.autoencoder.last_layer)
            loss = loss + weight * g_loss
            self.log_dict({"train/g_loss": g_loss.detach(), "train/disc_weight": weight}, batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        self._optimizer_step(ae_optimizer, ae_scheduler, loss)
        if disc_on:
            d_loss = discriminator_loss(self.discriminator(x.detach()), self.discriminator(reconstruction.detach()),
                                        self.hparams.disc_loss)
            self.log("train/d_loss", d_loss.detach(), batch_size=size)
            self._optimizer_step(disc_optimizer, disc_scheduler, d_loss)
        return loss.detach()

    def _optimizer_step(self, optimizer: Any, scheduler: Any, loss: Tensor) -> None:
        """zero_grad, backward, clip (``gradient_clip_val``), step, then step the optimizer's schedule."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val,
                                gradient_clip_algorithm=self.hparams.gradient_clip_algorithm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        """Reconstruct from the posterior mode; log ``{stage}/ae_l1``, ``/ae_psnr``, ``/kl`` and ``/loss``."""
        x = batch["image"]
        reconstruction, posterior = self.autoencoder(x, sample_posterior=False)
        rec_loss = reconstruction_loss(reconstruction, x, self.hparams.l2_weight)
        kl = posterior.kl().mean()
        size = x.shape[0]
        self.log(f"{stage}/ae_psnr", psnr(reconstruction, x).mean().float(), prog_bar=True, sync_dist=True,
                 batch_size=size)
        self.log_dict({f"{stage}/ae_l1": (reconstruction - x).abs().mean(), f"{stage}/kl": kl,
                       f"{stage}/loss": rec_loss + self.hparams.kl_weight * kl}, sync_dist=True, batch_size=size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ------------------------------------------------------------------------------------------- optimisation

    def configure_optimizers(self) -> Any:
        """One optimizer (and schedule) without a discriminator; else the autoencoder's and the discriminator's, each
        schedule's ``total_steps`` left None being that optimizer's share of the fit (see the class docstring)."""
        if self.discriminator is None:
            return super().configure_optimizers()
        total = self.trainer.estimated_stepping_batches
        ae_total = (None if not math.isfinite(total) else autoencoder_steps(int(total), self.hparams.disc_start)
                    if self.trainer.max_steps != -1 else int(total))
        totals = (ae_total, None if ae_total is None else max(0, ae_total - self.hparams.disc_start))
        return [configure_optimization(self, self.optimizer_factory, self.scheduler_factory, list(part.parameters()),
                                       part_total)
                for part, part_total in zip((self.autoencoder, self.discriminator), totals)]
