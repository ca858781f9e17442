"""The KL-regularised autoencoder of latent diffusion and its patch discriminator (Rombach et al. 2022, Sec. 3 and
App. G), with the loss terms that train them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.core.spec import Configurable
from diffusion_pl.nets.unet import AttentionBlock, group_norm

Shape = tuple[int, int, int]
DiscLoss = Literal["hinge", "vanilla"]


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))), log-variance clamped to [-30, 20] (as LDM's
    ``DiagonalGaussianDistribution``) so that exp stays finite.

    Args:
        mean: Posterior mean (B, C, H, W).
        logvar: Posterior log-variance, same shape.
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def var(self) -> Tensor:
        return self.logvar.exp()

    @property
    def std(self) -> Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick, Kingma & Welling 2014, eq. 10)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """Per sample, KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2), summed over
        all latent dimensions j (Kingma & Welling 2014, App. B), shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice with a residual (a 1x1 conv when the width changes), LDM's ``ResnetBlock``
    without the time embedding."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(group_norm(in_channels), nn.SiLU(), _conv3x3(in_channels, out_channels),
                                  group_norm(out_channels), nn.SiLU(), _conv3x3(out_channels, out_channels))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv3x3 (LDM pads right/bottom by one and uses no padding in the conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int, attention: bool) -> nn.Sequential:
    """ResBlock, (self-attention,) ResBlock at the lowest resolution."""
    layers: list[nn.Module] = [ResnetBlock(channels, channels)]
    if attention:
        layers.append(AttentionBlock(channels, num_heads=1))
    layers.append(ResnetBlock(channels, channels))
    return nn.Sequential(*layers)


class KLAutoencoder(Configurable, nn.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3; LDM's ``AutoencoderKL``).

    Encoder: conv_in; per level ``num_res_blocks`` ResBlocks of width ``base_channels * mult``, then a stride-2
    downsample except at the last level; mid ResBlock (+ self-attention) + ResBlock; GroupNorm-SiLU-conv to
    2 * ``latent_channels`` (mean, log-variance), then the optional 1x1 ``quant_conv``. The decoder mirrors it
    (``post_quant_conv``, mid block, levels in reverse with ``num_res_blocks + 1`` ResBlocks and upsampling,
    GroupNorm-SiLU-conv to ``in_channels``, no tanh). The downsampling factor is f = 2^(len(channel_mult) - 1).

    Args:
        in_channels: Image channels.
        latent_channels: Channels of the latent z.
        base_channels: Width of the first level.
        channel_mult: Width multiplier per level.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more, as in LDM).
        attention: One single-head self-attention block in each mid block (at the lowest resolution).
        quant_conv: LDM's 1x1 convs on the moments (encoder side) and on z (decoder side).
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, base_channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, attention: bool = False,
                 quant_conv: bool = True) -> None:
        super().__init__()
        if not channel_mult or min(channel_mult) < 1 or num_res_blocks < 1 or min(in_channels, latent_channels) < 1:
            raise ValueError(f"KLAutoencoder needs a non-empty channel_mult of positive ints and positive channels and "
                             f"num_res_blocks, got channel_mult={list(channel_mult)}, num_res_blocks={num_res_blocks}, "
                             f"in_channels={in_channels}, latent_channels={latent_channels}")
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.factor = 2 ** (len(channel_mult) - 1)
        widths = [base_channels * m for m in channel_mult]

        encoder: list[nn.Module] = [_conv3x3(in_channels, widths[0])]
        width = widths[0]
        for level, out in enumerate(widths):
            for _ in range(num_res_blocks):
                encoder.append(ResnetBlock(width, out))
                width = out
            if level < len(widths) - 1:
                encoder.append(Downsample(width))
        encoder += [_mid_block(width, attention), group_norm(width), nn.SiLU(), _conv3x3(width, 2 * latent_channels)]
        self.encoder = nn.Sequential(*encoder)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if quant_conv else nn.Identity()

        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if quant_conv else nn.Identity()
        decoder: list[nn.Module] = [_conv3x3(latent_channels, width), _mid_block(width, attention)]
        for level, out in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                decoder.append(ResnetBlock(width, out))
                width = out
            if level > 0:
                decoder.append(Upsample(width))
        decoder += [group_norm(width), nn.SiLU()]
        self.decoder = nn.Sequential(*decoder)
        self.conv_out = _conv3x3(width, in_channels)

    @property
    def last_layer(self) -> Tensor:
        """The weight of the decoder's output conv, where the adaptive GAN weight compares gradients."""
        return self.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1] -> the posterior q(z | x) over latents (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images (unbounded; [-1, 1] up to the reconstruction error)."""
        return self.conv_out(self.decoder(self.post_quant_conv(z)))

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): decode a sample of q(z | x), or its mode when not ``sample_posterior``."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def latent_shape(self, image_shape: Shape) -> Shape:
        """The latent (latent_channels, H / f, W / f) of images of shape (C, H, W)."""
        channels, height, width = image_shape
        if channels != self.in_channels:
            raise ValueError(f"the autoencoder takes {self.in_channels}-channel images, got {channels} channels: set "
                             "data.init_args.image_format.channels to the autoencoder's in_channels (or train one for "
                             "this data)")
        if height % self.factor or width % self.factor:
            raise ValueError(f"the autoencoder downsamples by f={self.factor} (channel_mult has "
                             f"{self.factor.bit_length()} levels), so image sides must be divisible by {self.factor}, "
                             f"got {height}x{width}: change data.init_args.image_format.image_size or use fewer levels")
        return self.latent_channels, height // self.factor, width // self.factor


class PatchDiscriminator(Configurable, nn.Module):
    """PatchGAN discriminator (Isola et al. 2017; LDM's ``NLayerDiscriminator``): a map of real/fake logits, one per
    overlapping patch. conv4x4 stride 2 + LeakyReLU(0.2), then ``num_layers - 1`` more stride-2 and one stride-1
    conv4x4-GroupNorm-LeakyReLU with doubling widths (at most 8x), then a conv4x4 to one logit channel. GroupNorm
    replaces pix2pix's BatchNorm so each sample's logits depend on that sample alone.

    Args:
        in_channels: Image channels.
        base_channels: Width of the first conv.
        num_layers: Number of stride-2 convs.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"PatchDiscriminator needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        width = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            layers += [nn.Conv2d(width, out, 4, stride=2 if n < num_layers else 1, padding=1, bias=False),
                       group_norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, 1, H', W')."""
        return self.layers(x)


# ------------------------------------------------------------------------------------------------------ losses


def reconstruction_loss(reconstruction: Tensor, target: Tensor, l2_weight: float = 0.0) -> Tensor:
    """mean |x - x_hat| + l2_weight * mean (x - x_hat)^2, means over batch and pixels (LDM's pixel loss, without
    LPIPS)."""
    difference = reconstruction - target
    loss = difference.abs().mean()
    return loss + l2_weight * difference.pow(2).mean() if l2_weight else loss


def generator_loss(fake_logits: Tensor) -> Tensor:
    """L_GAN of the autoencoder: -mean D(x_hat) (LDM's ``g_loss``, used for both discriminator losses)."""
    return -fake_logits.mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: DiscLoss = "hinge") -> Tensor:
    """Hinge: 1/2 [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))] (Lim & Ye 2017); vanilla (non-saturating
    cross-entropy): 1/2 [mean softplus(-D(x)) + mean softplus(D(x_hat))] (Goodfellow et al. 2014)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    if kind == "vanilla":
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {kind!r}")


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to [0, max_weight] and detached, with
    G_L the decoder's last layer (Rombach et al. 2022, App. G; Esser et al. 2021, eq. 7). Both losses keep their
    graphs."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
