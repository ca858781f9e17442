"""First stages: the frozen map between images and the space the diffusion model runs in (Rombach et al. 2022)."""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.core.errors import ConfigError
from diffusion_pl.core.spec import Configurable, build, spec_of
from diffusion_pl.nets.loading import load_checkpoint, rebuild, wrong_kind_error

Shape = tuple[int, int, int]
#: Sums a tensor over all processes (``trainer.strategy.reduce(x, reduce_op="sum")``; the identity on one process).
ReduceSum = Callable[[Tensor], Tensor]

log = logging.getLogger(__name__)


class FirstStage(Configurable, nn.Module, abc.ABC):
    """z_0 = encode(x_0) and x_0 = decode(z_0) (Rombach et al. 2022, Sec. 3): the diffusion model learns and samples
    z; grids, predict and FID decode. A first stage is frozen: it is not trained with the diffusion model."""

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latents (B, *latent_shape); a stochastic encoder draws from the global
        RNG while training only (evaluation stays deterministic)."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (up to the stage's reconstruction error)."""

    @abc.abstractmethod
    def latent_shape(self, image_shape: Shape) -> Shape:
        """The latent (C', H', W') of images of shape (C, H, W)."""

    @property
    def clips_to_data_range(self) -> bool:
        """Whether predicted x0 may be clamped to [-1, 1] while sampling (pixels: yes; latents: no)."""
        return False

    def latent_mask(self, mask: Tensor, image_shape: Shape) -> Tensor:
        """The known part (1) of the latents of images whose known pixels are ``mask`` (B, 1, H, W) (inpainting):
        for a stage that only rearranges pixels, the mask mapped like an image."""
        return (self.encode(mask.expand(-1, image_shape[0], -1, -1)) > 0.5).to(mask.dtype)

    @property
    def calibration_images(self) -> int:
        """How many training images :meth:`calibrate` wants before fitting starts (0: none, nothing to estimate)."""
        return 0

    def calibrate(self, batches: Iterable[Tensor], reduce_sum: ReduceSum) -> None:
        """Estimate data-dependent constants from this process's share of the training images (``batches``),
        summing statistics over all processes with ``reduce_sum``. Called once, when a fit starts."""


class IdentityStage(FirstStage):
    """Pixel-space diffusion: the latent is the image."""

    def __init__(self) -> None:
        super().__init__()

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents

    def latent_shape(self, image_shape: Shape) -> Shape:
        return tuple(image_shape)  # type: ignore[return-value]

    @property
    def clips_to_data_range(self) -> bool:
        return True


class SpaceToDepth(FirstStage):
    """A fixed, exactly invertible linear first stage: each ``factor`` x ``factor`` patch becomes ``factor**2``
    channels (pixel unshuffle), so the net runs on (C f^2, H / f, W / f). It wires and tests the latent path
    (shapes, links, decoding for grids and FID) without a trained autoencoder.

    Args:
        factor: The downsampling factor f (the image side must be divisible by it).
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"SpaceToDepth factor must be >= 1, got {factor}")
        self.factor = factor

    def encode(self, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.factor)

    def latent_shape(self, image_shape: Shape) -> Shape:
        channels, height, width = image_shape
        if height % self.factor or width % self.factor:
            raise ValueError(f"SpaceToDepth(factor={self.factor}) needs image sides divisible by {self.factor}, got "
                             f"{height}x{width}: change data.init_args.image_format.image_size or the factor")
        return channels * self.factor**2, height // self.factor, width // self.factor


class Autoencoder(FirstStage):
    """A trained KL autoencoder (an ``AutoencoderModule`` checkpoint, ``configs/ldm/autoencoder_*.yaml``) as the
    first stage of latent diffusion (Rombach et al. 2022, Sec. 3 and App. D.1): z = s E(x), x = D(z / s).

    The scale s = 1 / std(E(x)) makes the latents unit-variance, so a noise schedule built for data in [-1, 1]
    fits them. LDM takes it from the first batch on rank 0; here it is estimated from ``calibration_images``
    training images spread over all processes, with the posterior's second moment in closed form,
    E[z^2] = mu^2 + sigma^2, so it does not depend on encoder noise, the batch size or the number of processes.
    It is a buffer: checkpoints of the diffusion model store it, and a resumed or reloaded model keeps it.

    Frozen: the diffusion model's optimizer and EMA never see its weights (they are shared, not copied, by the EMA).

    A diffusion checkpoint holds the autoencoder's weights and records its architecture (``net``), so a trained
    latent model loads and predicts without the autoencoder file; only its architecture and the scale must agree
    with the config (the path, ``sample_posterior`` and ``calibration_images`` are :attr:`SETTINGS`).

    Args:
        checkpoint: The ``AutoencoderModule`` checkpoint (its EMA weights when it was trained with EMA).
        sample_posterior: Encode training batches as z ~ q(z | x) (LDM); False: the posterior mean, as always outside
            training.
        scale: A known scale s; None: estimate it when fitting starts.
        calibration_images: Training images the estimate uses (all processes together).
        net: The autoencoder's architecture (its net's spec), recorded in the spec from the file: built
            from it, with weights to be loaded, when the file is gone.
    """

    SETTINGS = ("checkpoint", "sample_posterior", "calibration_images", "net")

    def __init__(self, checkpoint: str, sample_posterior: bool = True, scale: float | None = None,
                 calibration_images: int = 5000, net: dict[str, Any] | None = None) -> None:
        super().__init__()
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"the latent scale must be a positive number, got {scale}: leave it null to estimate it")
        if calibration_images < 1:
            raise ConfigError(f"calibration_images must be >= 1, got {calibration_images}")
        if net is not None and not Path(checkpoint).is_file():
            with torch.random.fork_rng(devices=[]):  # random initial weights, replaced by the checkpoint's
                self.autoencoder = build(net, "the first stage's net")
        else:
            loaded = load_checkpoint(checkpoint, what="autoencoder checkpoint",
                                     how_to_make="train one with diffusion-pl fit --config "
                                                 "configs/ldm/autoencoder_fashion_mnist.yaml")
            wrong_kind = wrong_kind_error(loaded, checkpoint, "AutoencoderModule")
            if wrong_kind is not None:
                raise wrong_kind
            self.autoencoder = rebuild(loaded, "net", "autoencoder.", checkpoint, "AutoencoderModule checkpoint")
        self.autoencoder.requires_grad_(False)
        self.sample_posterior = sample_posterior
        self._calibration_images = calibration_images
        self.register_buffer("scale", torch.tensor(0.0 if scale is None else float(scale)))

    def recorded_init_args(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The given arguments with the architecture read from the file (``net``)."""
        return {**arguments, "net": spec_of(self.autoencoder)}

    def train(self, mode: bool = True) -> Autoencoder:
        """The autoencoder stays in eval mode (it is frozen)."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    @property
    def calibrated(self) -> bool:
        """Whether the scale is known (given, estimated, or loaded with a checkpoint)."""
        return bool(self.scale > 0)

    @property
    def calibration_images(self) -> int:
        return 0 if self.calibrated else self._calibration_images

    def _require_scale(self) -> Tensor:
        if not self.calibrated:
            raise RuntimeError("the latent scale of the Autoencoder first stage is not known yet: it is estimated "
                               "when `fit` starts and stored in the diffusion model's checkpoint; load such a "
                               "checkpoint (--ckpt_path) or set model.init_args.first_stage.init_args.scale")
        return self.scale

    def encode(self, images: Tensor) -> Tensor:
        """z = s E(x): a posterior sample while training (``sample_posterior``), else the posterior mean (evaluation,
        inpainting, interpolation)."""
        posterior = self.autoencoder.encode(images)
        latents = posterior.sample() if self.sample_posterior and self.training else posterior.mode()
        return latents * self._require_scale()

    def decode(self, latents: Tensor) -> Tensor:
        """x = D(z / s)."""
        return self.autoencoder.decode(latents / self._require_scale())

    def latent_shape(self, image_shape: Shape) -> Shape:
        return tuple(self.autoencoder.latent_shape(tuple(image_shape)))  # type: ignore[return-value]

    def latent_mask(self, mask: Tensor, image_shape: Shape) -> Tensor:
        """A latent position is known when every pixel of its f x f block is (a min-pool of the mask), in every
        latent channel: the latents of a partly known block mix known and unknown pixels."""
        channels, height, _ = self.latent_shape(image_shape)
        factor = image_shape[1] // height
        return (-F.max_pool2d(-mask, factor)).expand(-1, channels, -1, -1)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor], reduce_sum: ReduceSum) -> None:
        """s = 1 / std(z) over the latents of every process's images (Rombach et al. 2022, App. D.1), from the sums
        of z and z^2 (posterior moments: E[z] = mu, E[z^2] = mu^2 + sigma^2 when sampling the posterior)."""
        if self.calibrated:
            return
        sums = torch.zeros(3, dtype=torch.float64, device=self.scale.device)
        for images in batches:
            posterior = self.autoencoder.encode(images.to(self.scale.device))
            mean = posterior.mean.double()
            second = mean.square() + (posterior.var.double() if self.sample_posterior else 0.0)
            sums += torch.stack([sums.new_tensor(mean.numel()), mean.sum(), second.sum()])
        count, total, total_sq = reduce_sum(sums).tolist()
        if count == 0:
            raise RuntimeError("no training images reached the latent-scale estimate: the data module gave none")
        variance = total_sq / count - (total / count) ** 2
        if not variance > 0:
            raise RuntimeError(f"the autoencoder's latents have variance {variance} over {int(count)} values: the "
                               "autoencoder checkpoint is degenerate (collapsed latents); retrain it")
        self.scale.fill_(1.0 / math.sqrt(variance))
        log.info("latent scale s = %.5g: 1 / std of the latents of %d training images", self.scale.item(),
                 int(count) // math.prod(self.latent_shape(tuple(images.shape[1:]))))
