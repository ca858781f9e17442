"""DDPM / ADM-style UNet noise-prediction network.

Layout follows Ho et al. 2020, App. B (the CIFAR-10 model: 35.7M parameters with the defaults);
multi-head attention, learned-variance output, class embedding and BigGAN-style resampling
residual blocks follow Nichol & Dhariwal 2021 ("Improved DDPM") and Dhariwal & Nichol 2021 (ADM).
Optional conditioning routes: the noise-augmentation level of a conditioning image embedded like time
(cascaded diffusion, Ho et al. 2021; Imagen, Saharia et al. 2022), a pooled vector added to the time
embedding, and per-token context through cross-attention (latent diffusion, Rombach et al. 2022, Sec. 3.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.core.errors import InputShapeError
from diffusion_pl.core.spec import Configurable
from diffusion_pl.core.tensors import append_dims

__all__ = [
    "UNet", "SinusoidalEmbedding", "EmbedBlock", "ContextBlock", "ResBlock", "AttentionBlock", "CrossAttention",
    "SpatialTransformer",
]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Ho et al. 2020, App. B), fewer for narrow layers.

    Uses the largest divisor of ``channels`` that is at most 32 and leaves at least two channels per
    group: with one channel per group (instance norm) the norm after the time-embedding bias in
    :class:`ResBlock` would subtract that bias exactly and the net would ignore ``t``.
    """
    limit = max(1, min(32, channels // 2))
    groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution that keeps the spatial size (or halves it with ``stride=2``)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts as the identity (Ho et al. 2020, App. B)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def upsample(channels: int) -> nn.Sequential:
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv (Ho et al. 2020, App. B)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv3x3(channels, channels))


class SinusoidalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the diffusion time (Vaswani et al. 2017; Ho et al. 2020, App. B).

    ``emb(t) = [sin(t * f_0..f_{h-1}), cos(t * f_0..f_{h-1})]`` with ``f_i = max_period^(-i / (h - 1))``,
    ``h = dim // 2``, zero-padded to ``dim`` when ``dim`` is odd.

    Args:
        dim: Embedding width.
        max_period: Longest wavelength of the sinusoids.
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """Embed times ``t`` of shape (B,) into (B, dim)."""
        args = torch.outer(t.float(), self.freqs.float())
        emb = torch.cat([args.sin(), args.cos()], dim=-1)
        return F.pad(emb, (0, self.dim % 2)).to(self.freqs.dtype)


class EmbedBlock(nn.Module):
    """A layer that also consumes the (time + conditioning) embedding: ``forward(x, emb)``."""


class ContextBlock(nn.Module):
    """A layer that also consumes per-token context features: ``forward(x, context)``."""


def _resampler(kind: str | None) -> nn.Module:
    """Parameter-free resampling of a residual block: ``"up"`` nearest x2, ``"down"`` 2x2 average pool."""
    if kind == "up":
        return nn.Upsample(scale_factor=2, mode="nearest")
    if kind == "down":
        return nn.AvgPool2d(2)
    if kind is None:
        return nn.Identity()
    raise ValueError(f"resample must be None, 'up' or 'down', got {kind!r}.")


class ResBlock(EmbedBlock):
    """Residual block with a time-embedding bias (Ho et al. 2020, App. B; Dhariwal & Nichol 2021, App. A).

    ``h = conv(SiLU(GN(x))) + Linear(SiLU(emb))``; ``out = skip(x) + conv(Dropout(SiLU(GN(h))))``.
    With ``resample`` set, both branches are resampled after the first normalisation (BigGAN-style).

    Args:
        in_channels: Input channels.
        out_channels: Output channels (a 1x1 conv skip is used when they differ).
        emb_dim: Width of the time (+ class) embedding.
        dropout: Dropout probability before the second conv.
        resample: ``None``, ``"up"`` (nearest x2) or ``"down"`` (2x2 average pooling).
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, resample: str | None = None
    ) -> None:
        super().__init__()
        self.resample = _resampler(resample)
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(conv3x3(out_channels, out_channels))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block to ``x`` (B, C, H, W) conditioned on ``emb`` (B, emb_dim)."""
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        h = h + append_dims(self.emb_proj(F.silu(emb)), h.ndim)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(self.resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head spatial self-attention with a residual connection (Ho et al. 2020, App. B; Nichol & Dhariwal 2021).

    Args:
        channels: Feature channels; must be divisible by ``num_heads``.
        num_heads: Number of attention heads.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Attend over all H*W positions of ``x`` (B, C, H, W)."""
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, height, width))


def time_mlp(base_channels: int, emb_dim: int) -> nn.Sequential:
    """Sinusoidal embedding followed by Linear-SiLU-Linear (Ho et al. 2020, App. B)."""
    return nn.Sequential(
        SinusoidalEmbedding(base_channels),
        nn.Linear(base_channels, emb_dim),
        nn.SiLU(),
        nn.Linear(emb_dim, emb_dim),
    )


class CrossAttention(nn.Module):
    """Multi-head attention from queries ``x`` to keys and values ``context`` (Rombach et al. 2022, Sec. 3.3).

    ``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` with ``Q = W_Q x``, ``K = W_K context``,
    ``V = W_V context`` (Vaswani et al. 2017); self-attention when ``context`` is ``x``.

    Args:
        dim: Width of the queries and of the output; must be divisible by ``num_heads``.
        context_dim: Width of the context tokens.
        num_heads: Attention heads, each ``dim // num_heads`` wide.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _split_heads(self, h: Tensor) -> Tensor:
        """(B, N, heads * d) -> (B, heads, N, d)."""
        return h.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Attend from ``x`` (B, N, dim) to ``context`` (B, M, context_dim); returns (B, N, dim)."""
        q, k, v = (self._split_heads(h) for h in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Gated-GELU feed-forward of the transformer block (Shazeer 2020): ``Linear(a * GELU(g))``, ``[a, g] = Linear(x)``.

    Args:
        dim: Token width.
        mult: Hidden width multiplier.
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated feed-forward to tokens ``x`` (B, N, dim)."""
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and feed-forward, each residual (Rombach et al. 2022)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = CrossAttention(dim, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Update tokens ``x`` (B, N, dim) given ``context`` (B, M, context_dim)."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(ContextBlock):
    """Cross-attention of a feature map to context tokens (Rombach et al. 2022, Sec. 3.3; LDM's SpatialTransformer).

    ``out = x + proj_out(T(proj_in(GN(x)), context))`` where ``T`` is a :class:`TransformerBlock` over the
    ``H*W`` positions; ``proj_out`` is zero-initialised, so a fresh block is the identity and a fresh net's
    output does not depend on ``context``.

    Args:
        channels: Feature channels; must be divisible by ``num_heads``.
        context_dim: Width of the context tokens.
        num_heads: Attention heads.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, context_dim, num_heads)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        """Apply the block to ``x`` (B, C, H, W) given ``context`` (B, M, context_dim), which is required."""
        if context is None:
            raise ValueError("SpatialTransformer needs context of shape (B, M, context_dim); it never self-attends.")
        b, c, height, width = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = self.block(h, context).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class EmbedSequential(nn.Sequential):
    """Sequential container that gives each layer what it consumes besides ``x``.

    :class:`EmbedBlock` layers get ``emb``, :class:`ContextBlock` layers get ``context``, others only ``x``.
    """

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        """Run the layers in order."""
        for layer in self:
            if isinstance(layer, EmbedBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _check_levels(image_size: int, channel_mult: Sequence[int], num_res_blocks: int) -> None:
    """Raise ``ValueError`` with a fix unless ``image_size`` survives ``len(channel_mult) - 1`` halvings."""
    if not channel_mult or num_res_blocks < 1:
        raise ValueError(
            f"channel_mult={tuple(channel_mult)}, num_res_blocks={num_res_blocks}: give one multiplier per "
            f"resolution level, e.g. (1, 2, 2, 2), and at least one residual block per level."
        )
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < factor or image_size % factor:
        max_levels = (image_size & -image_size).bit_length() if image_size > 0 else 0  # 1 + power of 2 in size
        suggestion = max(factor, round(image_size / factor) * factor)
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**(len(channel_mult)-1)={factor} for "
            f"channel_mult={tuple(channel_mult)}: the UNet halves the resolution {len(channel_mult) - 1} times. "
            f"Use image_size={suggestion} (any multiple of {factor}) or at most {max_levels} levels in channel_mult."
        )


def _check_attention(
    image_size: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int], base_channels: int,
    num_heads: int, *, resolutions_arg: str = "attention_resolutions", heads_arg: str = "num_heads",
) -> None:
    """Raise ``ValueError`` with a fix for attention at absent resolutions or a bad head count.

    ``resolutions_arg`` and ``heads_arg`` name the constructor arguments in the message.
    """
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    missing = sorted(set(attention_resolutions) - set(resolutions))
    if missing:
        raise ValueError(
            f"{resolutions_arg}={tuple(attention_resolutions)} contains {missing}, which never occur in this net: "
            f"with image_size={image_size} and channel_mult={tuple(channel_mult)} the feature maps are {resolutions}. "
            f"Choose attention resolutions among those."
        )
    widths = {base_channels * channel_mult[resolutions.index(r)] for r in attention_resolutions}
    widths.add(base_channels * channel_mult[-1])  # the middle block always attends
    if num_heads < 1 or any(w % num_heads for w in widths):
        raise ValueError(
            f"{heads_arg}={num_heads} does not divide the channel counts {sorted(widths)} of the attention layers: "
            f"pick a positive {heads_arg} dividing all of them."
        )


def _check_routes(
    vector_dim: int | None, context_dim: int | None, cross_attention_resolutions: Sequence[int],
    transformer_heads: int | None,
) -> None:
    """Raise ``ValueError`` with a fix for bad widths of the vector / context routes or orphaned options."""
    for name, value in (("vector_dim", vector_dim), ("context_dim", context_dim)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: give the positive width of the conditioning features, or None.")
    if context_dim is None and (cross_attention_resolutions or transformer_heads is not None):
        raise ValueError(
            f"cross_attention_resolutions={tuple(cross_attention_resolutions)}, transformer_heads={transformer_heads} "
            f"configure cross-attention, which needs context_dim: set context_dim to the width of the context tokens."
        )


def _check_route(name: str, value: Tensor | None, built: bool, built_with: str, shape: str, fix: str) -> None:
    """Raise ``ValueError`` unless the optional input ``name`` is given exactly when the net was ``built`` for it."""
    if value is None and built:
        raise ValueError(f"UNet was built with {built_with} but {name} is missing; pass {name} of shape {shape}.")
    if value is not None and not built:
        raise ValueError(
            f"UNet got {name} of shape {tuple(value.shape)} but was built without its route; set {fix} "
            f"(or do not pass {name})."
        )


class UNet(Configurable, nn.Module):
    """DDPM UNet (Ho et al. 2020, App. B) with the improvements of Nichol & Dhariwal 2021.

    Down path: per level ``num_res_blocks`` residual blocks (+ self-attention where the feature map is
    listed in ``attention_resolutions``), then a downsample except at the last level; middle:
    res-attn-res; up path: per level ``num_res_blocks + 1`` residual blocks on concatenated skips,
    then an upsample except at the last level; out: GroupNorm-SiLU-conv3x3. With ``context_dim`` set, a
    :class:`SpatialTransformer` follows the residual block (and self-attention) at each
    ``cross_attention_resolutions`` and in the middle block (Rombach et al. 2022, Sec. 3.3).

    The layers of the optional routes (``cond_level_embedding``, ``vector_dim``, ``context_dim``) are created
    after all others, so the same seed gives the other layers the same initial weights with or without them.

    Args:
        image_size: Height and width of the inputs; must be divisible by ``2**(len(channel_mult)-1)``.
        in_channels: Channels of the noisy image ``x``.
        out_channels: Channels of one prediction (e.g. eps); defaults to ``in_channels``.
        base_channels: Width ``ch`` of the first level; the time embedding has ``4 * ch`` channels.
        channel_mult: Width multiplier of each resolution level.
        num_res_blocks: Residual blocks per level on the down path (one more on the up path).
        attention_resolutions: Feature-map sizes (e.g. 16 for 16x16) that get self-attention.
        num_heads: Attention heads.
        dropout: Dropout probability inside residual blocks (0.1 for CIFAR-10 in Ho et al.).
        num_classes: If set, a class embedding with ``num_classes + 1`` rows is added to the time
            embedding; row ``num_classes`` is the null label for classifier-free guidance
            (Ho & Salimans 2022).
        cond_channels: Channels of an image ``cond`` concatenated to ``x`` (e.g. the upsampled low-res
            image of a super-resolution stage, Saharia/Ho et al. 2021).
        learn_sigma: Also output the variance interpolation ``v`` (Nichol & Dhariwal 2021, eq. 15),
            doubling the output channels: ``[eps, v]`` along dim 1.
        resblock_updown: Resample with residual blocks (BigGAN-style, Dhariwal & Nichol 2021) instead
            of strided / nearest-neighbour convs.
        cond_level_embedding: Embed ``cond_level``, the noise-augmentation level of ``cond``, like the time
            (own sinusoidal embedding + MLP) and add it to the time embedding (Ho et al. 2021, Sec. 4.2;
            Saharia et al. 2022). Give the level on the scale of ``t`` (e.g. the augmentation process's
            ``net_input_time``).
        vector_dim: Width of a ``vector`` (e.g. a pooled text embedding) whose linear projection is added to
            the time embedding.
        context_dim: Width of per-token ``context`` features (e.g. a text encoder's), attended to by
            cross-attention blocks (Rombach et al. 2022, Sec. 3.3).
        cross_attention_resolutions: Feature-map sizes that get a cross-attention block (the middle block
            always gets one, as in LDM); empty means the same as ``attention_resolutions`` (so only the middle
            block when that is empty too). Needs ``context_dim``.
        transformer_heads: Heads of the cross-attention blocks; ``None`` means ``num_heads``. Needs
            ``context_dim``.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.1,
        num_classes: int | None = None,
        cond_channels: int = 0,
        learn_sigma: bool = False,
        resblock_updown: bool = False,
        cond_level_embedding: bool = False,
        vector_dim: int | None = None,
        context_dim: int | None = None,
        cross_attention_resolutions: Sequence[int] = (),
        transformer_heads: int | None = None,
    ) -> None:
        super().__init__()
        _check_levels(image_size, channel_mult, num_res_blocks)
        _check_attention(image_size, channel_mult, attention_resolutions, base_channels, num_heads)
        _check_routes(vector_dim, context_dim, cross_attention_resolutions, transformer_heads)
        cross_resolutions = tuple(cross_attention_resolutions or attention_resolutions)
        transformer_heads = num_heads if transformer_heads is None else transformer_heads
        if context_dim is not None:
            _check_attention(
                image_size, channel_mult, cross_resolutions, base_channels, transformer_heads,
                resolutions_arg="cross_attention_resolutions", heads_arg="transformer_heads",
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.cond_channels = cond_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.cond_level_embedding = cond_level_embedding
        self.vector_dim = vector_dim
        self.context_dim = context_dim
        self.cross_attention_resolutions = cross_resolutions if context_dim is not None else ()
        self._dropout = dropout
        self._resblock_updown = resblock_updown
        emb_dim = 4 * base_channels
        self.time_embed = time_mlp(base_channels, emb_dim)
        self.label_embed = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = conv3x3(in_channels + cond_channels, base_channels)
        widths = [base_channels * m for m in channel_mult]
        attn, cross = set(attention_resolutions), set(self.cross_attention_resolutions)
        sites: list[tuple[EmbedSequential, int, int]] = []  # (block, index, channels) of each cross-attention
        self.down, skip_channels = self._build_down(
            base_channels, widths, num_res_blocks, attn, num_heads, emb_dim, cross, sites
        )
        self.middle = EmbedSequential(
            ResBlock(widths[-1], widths[-1], emb_dim, dropout),
            AttentionBlock(widths[-1], num_heads),
            ResBlock(widths[-1], widths[-1], emb_dim, dropout),
        )
        sites.append((self.middle, 2, widths[-1]))
        self.up = self._build_up(widths, num_res_blocks, attn, num_heads, emb_dim, skip_channels, cross, sites)
        self.out = nn.Sequential(
            group_norm(widths[0]), nn.SiLU(),
            zero_init(conv3x3(widths[0], self.out_channels * (2 if learn_sigma else 1))),
        )
        # The optional routes come last: the layers above draw the same initial weights with or without them.
        self.cond_level_embed = time_mlp(base_channels, emb_dim) if cond_level_embedding else None
        self.vector_embed = None if vector_dim is None else nn.Linear(vector_dim, emb_dim)
        if context_dim is not None:
            for block, index, channels in sites:
                block.insert(index, SpatialTransformer(channels, context_dim, transformer_heads))

    @property
    def null_label(self) -> int | None:
        """Class index meaning "no label" (classifier-free guidance), or ``None`` for an unconditional net."""
        return self.num_classes

    def _resample(self, channels: int, emb_dim: int, direction: str) -> nn.Module:
        """Downsample (strided conv) or upsample (nearest + conv), or a resampling ResBlock (ADM)."""
        if self._resblock_updown:
            return ResBlock(channels, channels, emb_dim, self._dropout, resample=direction)
        return conv3x3(channels, channels, stride=2) if direction == "down" else upsample(channels)

    def _build_down(
        self, ch: int, widths: list[int], num_res_blocks: int, attn: set[int], num_heads: int, emb_dim: int,
        cross: set[int], sites: list[tuple[EmbedSequential, int, int]],
    ) -> tuple[nn.ModuleList, list[int]]:
        """Build the down path from ``ch`` input channels; return its blocks and every skip's channels.

        Appends to ``sites`` where a cross-attention block belongs (resolutions in ``cross``).
        """
        blocks, skips, res = nn.ModuleList(), [ch], self.image_size
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, width, emb_dim, self._dropout)]
                ch = width
                if res in attn:
                    layers.append(AttentionBlock(ch, num_heads))
                blocks.append(EmbedSequential(*layers))
                if res in cross:
                    sites.append((blocks[-1], len(layers), ch))
                skips.append(ch)
            if level != len(widths) - 1:
                blocks.append(EmbedSequential(self._resample(ch, emb_dim, "down")))
                skips.append(ch)
                res //= 2
        return blocks, skips

    def _build_up(
        self, widths: list[int], num_res_blocks: int, attn: set[int], num_heads: int, emb_dim: int,
        skips: list[int], cross: set[int], sites: list[tuple[EmbedSequential, int, int]],
    ) -> nn.ModuleList:
        """Build the up path, consuming ``skips`` in reverse (Ho et al. 2020, App. B).

        Appends to ``sites`` where a cross-attention block belongs (before any upsampling).
        """
        blocks = nn.ModuleList()
        ch, res = widths[-1], self.image_size // 2 ** (len(widths) - 1)
        for level in reversed(range(len(widths))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), widths[level], emb_dim, self._dropout)]
                ch = widths[level]
                if res in attn:
                    layers.append(AttentionBlock(ch, num_heads))
                site = len(layers) if res in cross else None
                if level != 0 and i == num_res_blocks:
                    layers.append(self._resample(ch, emb_dim, "up"))
                    res *= 2
                blocks.append(EmbedSequential(*layers))
                if site is not None:
                    sites.append((blocks[-1], site, ch))
        return blocks

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Tensor | None, context: Tensor | None = None) -> None:
        """Raise ``ValueError`` saying expected vs got when inputs do not fit this net; images of the wrong size or
        channels (the data, or predict's input images) as :class:`InputShapeError`, which the command line prints
        as one message."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"UNet expected x of shape (B, in_channels={self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}; give images (data, or ImageFiles predict inputs) with matching channels, or "
                "build the net with in_channels matching the data."
            )
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise InputShapeError(
                f"UNet expected {self.image_size}x{self.image_size} inputs (image_size={self.image_size}), got "
                f"{x.shape[-2]}x{x.shape[-1]}; give images of that size (the data, or the ImageFiles predict input "
                f"at predict), or build the net with image_size={x.shape[-1]}."
            )
        if t.shape not in ((), (x.shape[0],)):
            raise ValueError(f"UNet expected t of shape ({x.shape[0]},) or a scalar, got {tuple(t.shape)}.")
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError(
                f"UNet was built with cond_channels={self.cond_channels} but cond is "
                f"{'missing' if cond is None else 'given'}; pass cond iff cond_channels > 0."
            )
        if cond is not None and cond.shape != (x.shape[0], self.cond_channels, *x.shape[-2:]):
            raise ValueError(
                f"UNet expected cond of shape {(x.shape[0], self.cond_channels, *x.shape[-2:])} "
                f"(cond_channels={self.cond_channels}, same size as x), got {tuple(cond.shape)}."
            )
        _check_route(
            "context", context, self.context_dim is not None, f"context_dim={self.context_dim} (cross-attention)",
            f"({x.shape[0]}, M, {self.context_dim}); for the unconditional case pass a null context, the net never "
            f"falls back to self-attention", "context_dim to the width of the context tokens",
        )
        if context is not None and (
            context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.context_dim
            or context.shape[1] < 1
        ):
            raise ValueError(
                f"UNet expected context of shape ({x.shape[0]}, M, context_dim={self.context_dim}) with M >= 1 "
                f"tokens, got {tuple(context.shape)}."
            )

    def embed(
        self, t: Tensor, y: Tensor | None, batch_size: int, *, cond_level: Tensor | None = None,
        vector: Tensor | None = None,
    ) -> Tensor:
        """Time embedding MLP (Ho et al. 2020, App. B) plus the class embedding (null label if ``y`` is None),
        the embedded augmentation level ``cond_level`` and the projected ``vector``, where the net has them."""
        emb = self.time_embed(t.expand(batch_size))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=emb.device)
            elif y.shape != (batch_size,):
                raise ValueError(f"UNet expected labels y of shape ({batch_size},), got {tuple(y.shape)}.")
            emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError("UNet got class labels y but was built with num_classes=None; set num_classes.")
        _check_route(
            "cond_level", cond_level, self.cond_level_embed is not None, "cond_level_embedding=True",
            f"({batch_size},) (the noise-augmentation level of cond)", "cond_level_embedding=True",
        )
        if cond_level is not None:
            if cond_level.shape not in ((), (batch_size,)):
                raise ValueError(
                    f"UNet expected cond_level of shape ({batch_size},) or a scalar, got {tuple(cond_level.shape)}."
                )
            emb = emb + self.cond_level_embed(cond_level.expand(batch_size))
        _check_route(
            "vector", vector, self.vector_embed is not None, f"vector_dim={self.vector_dim}",
            f"({batch_size}, {self.vector_dim})", "vector_dim to the width of the vector",
        )
        if vector is not None:
            if vector.shape != (batch_size, self.vector_dim):
                raise ValueError(
                    f"UNet expected vector of shape ({batch_size}, vector_dim={self.vector_dim}), "
                    f"got {tuple(vector.shape)}."
                )
            emb = emb + self.vector_embed(vector)
        return emb

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, cond: Tensor | None = None, *,
        cond_level: Tensor | None = None, vector: Tensor | None = None, context: Tensor | None = None,
    ) -> Tensor:
        """Predict eps (and ``v`` if ``learn_sigma``) for noisy images ``x`` at times ``t``.

        Args:
            x: Noisy images, shape (B, in_channels, image_size, image_size).
            t: Diffusion time fed to the sinusoidal embedding, shape (B,) or scalar, int or float.
            y: Class labels in ``[0, num_classes]`` (``num_classes`` = null label), shape (B,); ``None``
                means the null label for a class-conditional net.
            cond: Conditioning image concatenated to ``x``, shape (B, cond_channels, image_size, image_size).
            cond_level: Noise-augmentation level of ``cond`` on the scale of ``t``, shape (B,) or scalar;
                required iff the net was built with ``cond_level_embedding``.
            vector: Pooled conditioning features, shape (B, vector_dim); required iff ``vector_dim`` is set.
            context: Per-token conditioning features for cross-attention, shape (B, M, context_dim);
                required iff ``context_dim`` is set.

        Returns:
            Tensor of shape (B, out_channels * (2 if learn_sigma else 1), image_size, image_size).
        """
        self._check_inputs(x, t, cond, context)
        emb = self.embed(t, y, x.shape[0], cond_level=cond_level, vector=vector)
        h = self.conv_in(x if cond is None else torch.cat([x, cond], dim=1))
        skips = [h]
        for block in self.down:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle(h, emb, context)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
