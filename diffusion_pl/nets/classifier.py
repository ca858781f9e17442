"""Encoder classifier: the UNet's downsampling half with a pooled linear head.

The layout follows the ADM noisy classifier (Dhariwal & Nichol 2021, Sec. 4 and App. A: "the downsampling
trunk of the UNet ... with an attention pool at the 8x8 layer"), here with global average pooling. The
time embedding is optional: a clean classifier (e.g. the Fashion-MNIST FID feature extractor) ignores it,
a classifier for classifier guidance embeds the diffusion time of its noisy input x_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from diffusion_pl.core.spec import Configurable
from diffusion_pl.nets.loading import load_checkpoint, rebuild
from diffusion_pl.nets.unet import (
    AttentionBlock,
    EmbedSequential,
    ResBlock,
    SinusoidalEmbedding,
    _check_attention,
    _check_levels,
    conv3x3,
    group_norm,
)

__all__ = ["EncoderClassifier"]


class EncoderClassifier(Configurable, nn.Module):
    """Image classifier built like the UNet's down path (Ho et al. 2020, App. B; Dhariwal & Nichol 2021, App. A).

    conv3x3 -> per level ``num_res_blocks`` residual blocks (+ attention at ``attention_resolutions``) and a
    strided-conv downsample except at the last level -> res-attn-res middle -> GroupNorm-SiLU -> global
    average pool (the penultimate features, ``base_channels * channel_mult[-1]`` wide) -> linear logits.

    Args:
        image_size: Height and width of the inputs; must be divisible by ``2**(len(channel_mult)-1)``.
        in_channels: Image channels.
        num_classes: Number of classes (logits).
        base_channels: Width of the first level; the embedding has ``4 * base_channels`` channels.
        channel_mult: Width multiplier of each resolution level.
        num_res_blocks: Residual blocks per level.
        attention_resolutions: Feature-map sizes that get self-attention.
        num_heads: Attention heads.
        dropout: Dropout inside the residual blocks.
        time_conditional: Embed the diffusion time ``t`` (a noisy classifier for classifier guidance);
            ``t=None`` then means clean images (t = 0). Without it the residual blocks get a zero embedding,
            so their embedding projection reduces to a learned bias.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.0,
        time_conditional: bool = False,
    ) -> None:
        super().__init__()
        _check_levels(image_size, channel_mult, num_res_blocks)
        _check_attention(image_size, channel_mult, attention_resolutions, base_channels, num_heads)
        if num_classes < 2:
            raise ValueError(f"EncoderClassifier needs num_classes >= 2, got {num_classes}")
        self.config: dict[str, Any] = {
            "image_size": image_size, "in_channels": in_channels, "num_classes": num_classes,
            "base_channels": base_channels, "channel_mult": list(channel_mult), "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions), "num_heads": num_heads, "dropout": dropout,
            "time_conditional": time_conditional,
        }
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.time_conditional = time_conditional
        self.emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(base_channels), nn.Linear(base_channels, self.emb_dim), nn.SiLU(),
            nn.Linear(self.emb_dim, self.emb_dim),
        ) if time_conditional else None
        widths = [base_channels * m for m in channel_mult]
        self.num_features = widths[-1]
        self.conv_in = conv3x3(in_channels, base_channels)
        self.down = self._build_down(base_channels, widths, num_res_blocks, set(attention_resolutions), num_heads,
                                     dropout)
        self.middle = EmbedSequential(
            ResBlock(widths[-1], widths[-1], self.emb_dim, dropout),
            AttentionBlock(widths[-1], num_heads),
            ResBlock(widths[-1], widths[-1], self.emb_dim, dropout),
        )
        self.pool = nn.Sequential(group_norm(widths[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(widths[-1], num_classes)

    def _build_down(self, ch: int, widths: list[int], num_res_blocks: int, attn: set[int], num_heads: int,
                    dropout: float) -> nn.ModuleList:
        """The UNet's down path (without the skip bookkeeping) from ``ch`` input channels."""
        blocks, res = nn.ModuleList(), self.image_size
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, width, self.emb_dim, dropout)]
                ch = width
                if res in attn:
                    layers.append(AttentionBlock(ch, num_heads))
                blocks.append(EmbedSequential(*layers))
            if level != len(widths) - 1:
                blocks.append(EmbedSequential(conv3x3(ch, ch, stride=2)))
                res //= 2
        return blocks

    def _embed(self, t: Tensor | None, x: Tensor) -> Tensor:
        """Time embedding of ``t`` (zeros for a clean classifier; t = 0 when a time-conditional net gets None)."""
        batch = x.shape[0]
        if self.time_embed is None:
            if t is not None:
                raise ValueError("EncoderClassifier got a time t but was built with time_conditional=False; "
                                 "build it with time_conditional=True to classify noisy x_t.")
            return x.new_zeros(batch, self.emb_dim)
        if t is None:
            t = x.new_zeros(batch)
        if t.shape not in ((), (batch,)):
            raise ValueError(f"EncoderClassifier expected t of shape ({batch},) or a scalar, got {tuple(t.shape)}.")
        return self.time_embed(t.expand(batch))

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"EncoderClassifier expected images of shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(x.shape)}; build the net with image_size/in_channels matching the data."
            )

    def features(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Penultimate features (B, ``num_features``): the pooled output of the trunk.

        Args:
            x: Images (or noisy images x_t) in [-1, 1], shape (B, in_channels, image_size, image_size).
            t: Diffusion time the net embeds, shape (B,) or scalar; only for a time-conditional net.
        """
        self._check_input(x)
        emb = self._embed(t, x)
        h = self.conv_in(x)
        for block in self.down:
            h = block(h, emb)
        return self.pool(self.middle(h, emb))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Class logits (B, num_classes) of ``x`` (at time ``t`` for a time-conditional net)."""
        return self.head(self.features(x, t))


def load_classifier_net(checkpoint_path: str | Path) -> EncoderClassifier:
    """Rebuild the trained :class:`EncoderClassifier` of a :class:`ClassifierModule` checkpoint, on the CPU in eval
    mode, leaving the global RNG untouched (see :func:`diffusion_pl.nets.loading.rebuild`).

    Raises:
        FileNotFoundError: The checkpoint does not exist (the message says how to train one).
        ValueError: The file is not a ClassifierModule checkpoint.
    """
    checkpoint = load_checkpoint(checkpoint_path, what="classifier checkpoint", how_to_make=(
        "train the classifier first, e.g. `diffusion-pl fit --config configs/classifier/fashion_mnist.yaml` (writes "
        "runs/classifier_fashion_mnist/lightning_logs/version_N/checkpoints/last.ckpt), or point checkpoint_path at "
        "an existing one"))
    return rebuild(checkpoint, "net", "net.", str(checkpoint_path), "ClassifierModule checkpoint",
                   EncoderClassifier)
