"""Network architectures (plain ``nn.Module``s, no Lightning)."""

from diffusion_pl.nets.autoencoder import DiagonalGaussian, KLAutoencoder, PatchDiscriminator
from diffusion_pl.nets.classifier import EncoderClassifier
from diffusion_pl.nets.unet import UNet

__all__ = ["DiagonalGaussian", "EncoderClassifier", "KLAutoencoder", "PatchDiscriminator", "UNet"]
