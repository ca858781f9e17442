"""First stages: the frozen map between images and the space the diffusion model runs in (Rombach et al. 2022)."""

from __future__ import annotations

import abc

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.nets.spec import Configurable

Shape = tuple[int, int, int]


class FirstStage(Configurable, nn.Module, abc.ABC):
    """z_0 = encode(x_0) and x_0 = decode(z_0) (Rombach et al. 2022, Sec. 3): the diffusion model learns and samples
    z; grids, predict and FID decode. A first stage is frozen: it is not trained with the diffusion model."""

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latents (B, *latent_shape)."""

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
                             f"{height}x{width}: change data.init_args.image_size or the factor")
        return channels * self.factor**2, height // self.factor, width // self.factor
