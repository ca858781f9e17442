"""The low-resolution image of a super-resolution stage, with noise-conditioning augmentation (Ho et al. 2021,
Cascaded Diffusion Models, Sec. 4.2; Saharia et al. 2022, Imagen, Sec. 2.5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusion_pl.conditioning.base import Conditioner, NetKwargs, drop_mask
from diffusion_pl.core.errors import UserError
from diffusion_pl.core.resize import (
    DOWNSAMPLE_MODES,
    UPSAMPLE_MODES,
    DownsampleMode,
    UpsampleMode,
    downsample,
    upsample,
)
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.sde import VPSDE

#: Mixed into an item's seed for the noise of its low-res augmentation, apart from its prior noise.
_AUGMENTATION_SEED = 0x5DEECE66D


class MissingLowResError(UserError, KeyError):
    """A super-resolution stage got neither its low-res input nor a high-res image to make it from."""


class LowResImage(Conditioner):
    """``batch["low_res"]`` (or ``batch["image"]`` downsampled by ``factor``) -> the net's ``cond`` and ``cond_level``.

    The low-res image x_low is upsampled back to the model's resolution and corrupted at a level s of the
    augmentation ``process``: z_s = alpha(s) up(x_low) + sigma(s) eps (CDM's "Gaussian conditioning
    augmentation"). While training s ~ U[0, max_level] per sample, so the model learns not to trust the low-res
    input blindly; at sampling s = ``sampling_level`` (Imagen uses a fixed level). The net embeds s like the time
    (``cond_level``, on the process's network time scale: build the UNet with ``cond_level_embedding: true`` and
    ``cond_channels`` = the image channels).

    With ``dropout`` > 0 the condition becomes the null image (zeros, the level kept) with that probability, so
    the same net also learns the unconditional model and classifier-free guidance on the low-res image works
    (``guidance: [ClassifierFree]``).

    At sampling an item that carries a ``seed`` draws its augmentation noise from that seed, so an image depends
    only on its seed, whatever the batch.

    Args:
        factor: Resolution ratio of the stage (2 for 16 -> 32).
        process: The augmentation process; it must be noise-free at level 0 (default: ``VPSDE()``, levels in [0, 1]).
        max_level: Largest training level s_max (0: no augmentation).
        sampling_level: The level of the condition at sampling (Imagen: a fixed level; CDM sweeps it).
        dropout: Probability of dropping the condition while training (classifier-free guidance).
        downsample_mode: How ``batch["image"]`` becomes low-res: "area" (block average) or "bilinear" (antialiased).
        upsample_mode: How the low-res image is brought back to the model's size: "bilinear", "bicubic" or "nearest".
    """

    def __init__(self, factor: int = 2, process: ForwardProcess | None = None, max_level: float = 0.5,
                 sampling_level: float = 0.2, dropout: float = 0.0, downsample_mode: DownsampleMode = "area",
                 upsample_mode: UpsampleMode = "bilinear") -> None:
        super().__init__()
        process = process if process is not None else VPSDE()
        if factor < 1:
            raise ValueError(f"LowResImage needs a whole factor >= 1, got {factor}")
        zero = torch.zeros(1)
        if abs(float(process.alpha(zero)) - 1) > 1e-6 or float(process.sigma(zero)) > 1e-6:
            raise ValueError(f"the augmentation process must leave the image untouched at level 0 (alpha(0) = 1, "
                             f"sigma(0) = 0), {type(process).__name__} does not: use VPSDE or SubVPSDE")
        self.check_level("max_level", max_level)
        self.check_level("sampling_level", sampling_level)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"low-res condition dropout must be in [0, 1), got {dropout}")
        if downsample_mode not in DOWNSAMPLE_MODES or upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"LowResImage modes: downsample_mode one of {DOWNSAMPLE_MODES}, upsample_mode one of "
                             f"{UPSAMPLE_MODES}; got {downsample_mode!r}, {upsample_mode!r}")
        self.factor, self.process = factor, process
        self.max_level, self.sampling_level, self.dropout = max_level, sampling_level, dropout
        self.downsample_mode, self.upsample_mode = downsample_mode, upsample_mode

    @staticmethod
    def check_level(name: str, level: float) -> None:
        """Raise ValueError unless ``level`` is a level of the augmentation process, in [0, 1]."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"LowResImage {name} is a level of the augmentation process in [0, 1], got {level}")

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("low_res",)

    def check_net(self, net: nn.Module) -> None:
        if not getattr(net, "cond_channels", 0) or not getattr(net, "cond_level_embedding", False):
            raise ValueError(
                "LowResImage feeds the net an upsampled low-res image (cond) and its augmentation level "
                f"(cond_level); the net has cond_channels={getattr(net, 'cond_channels', None)}, cond_level_embedding="
                f"{getattr(net, 'cond_level_embedding', None)}: set model.init_args.net.init_args.cond_channels to the "
                "image channels and cond_level_embedding: true")

    def low_res(self, batch: dict[str, Any]) -> Tensor:
        """The batch's low-res images: ``batch["low_res"]``, else ``batch["image"]`` downsampled by ``factor``."""
        if "low_res" in batch:
            return batch["low_res"]
        if "image" in batch:
            return downsample(batch["image"], self.factor, self.downsample_mode)
        raise MissingLowResError(
            "a super-resolution stage needs its low-res input: batch['low_res'] (predict: "
            "model.init_args.predict_task=SuperResolve with --data.init_args.predict=diffusion_pl.data.ImageFiles "
            "--data.init_args.predict.path=PATH) or batch['image'] "
            "(high-res images, downsampled by the stage's factor)")

    def levels(self, n: int, device: torch.device, *, training: bool, generator: torch.Generator | None) -> Tensor:
        """s ~ U[0, max_level] per sample while training; ``sampling_level`` otherwise (shape (n,))."""
        if training:
            return self.max_level * torch.rand(n, device=device, generator=generator)
        return torch.full((n,), self.sampling_level, device=device)

    def augmentation_noise(self, like: Tensor, batch: dict[str, Any], *, training: bool,
                           generator: torch.Generator | None) -> Tensor:
        """eps of the augmentation: from each item's seed at sampling when the batch has seeds, else ``generator``."""
        if training or "seed" not in batch:
            return torch.randn(like.shape, device=like.device, generator=generator)
        seeds = batch["seed"].tolist()
        return torch.cat([torch.randn((1, *like.shape[1:]), generator=torch.Generator().manual_seed(
            int(seed) ^ _AUGMENTATION_SEED)) for seed in seeds]).to(like)

    def augment(self, image: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        """z_s = alpha(s) x + sigma(s) eps (the augmentation process's marginal at level s)."""
        return self.process.add_noise(image, level, noise)

    def forward(self, batch: dict[str, Any], *, training: bool, generator: torch.Generator | None = None) -> NetKwargs:
        low = self.low_res(batch)
        size = low.shape[-1] * self.factor
        image = upsample(low, size, self.upsample_mode)
        level = self.levels(image.shape[0], image.device, training=training, generator=generator)
        cond = self.augment(image, level, self.augmentation_noise(image, batch, training=training, generator=generator))
        if training and self.dropout > 0:
            keep = ~drop_mask((image.shape[0],), self.dropout, image.device, generator)
            cond = cond * append_dims(keep.to(cond.dtype), cond.ndim)
        return {"cond": cond, "cond_level": self.process.net_input_time(level)}

    def null(self, cond: NetKwargs) -> NetKwargs:
        return {"cond": torch.zeros_like(cond["cond"]), "cond_level": cond["cond_level"]}

    def example_batch(self, num_samples: int, device: torch.device | str,
                      real: Tensor | None = None) -> dict[str, Tensor]:
        """The low-res versions of ``real`` images (cycled to ``num_samples``): a super-resolution stage needs data."""
        if real is None or len(real) == 0:
            raise MissingLowResError("LowResImage needs real images to make the low-res inputs of sample grids and "
                                     "FID: run it with the ImageDataModule's validation split")
        index = torch.arange(num_samples) % len(real)
        return {"low_res": downsample(real[index.to(real.device)].to(device), self.factor, self.downsample_mode)}


def set_sampling_level(module: nn.Module, level: float, where: str) -> None:
    """Set the sampling level of every ``LowResImage`` in ``module`` (e.g. a loaded stage); raise ValueError naming
    ``where`` when it has none."""
    LowResImage.check_level("sampling_level", level)
    parts = [part for part in module.modules() if isinstance(part, LowResImage)]
    if not parts:
        raise ValueError(f"{where}: sampling_level is set but the model has no low-res condition (LowResImage); "
                         "leave sampling_level unset for a model that is not a super-resolution stage")
    for part in parts:
        part.sampling_level = level
