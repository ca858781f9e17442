"""Text conditioning through a frozen CLIP text encoder, with caption dropout for classifier-free guidance."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_pl.conditioning.base import Conditioner, NetKwargs, drop_mask
from diffusion_pl.core.errors import ConfigError
from diffusion_pl.nets.clip import CLASS_NAMES_KEY, read_clip

log = logging.getLogger(__name__)

#: The prompt of the unconditional model: a caption dropped while training becomes the empty prompt.
NULL_PROMPT = ""


class Text(Conditioner):
    """``batch["caption"]`` (training data) or ``batch["prompt"]`` (sampling) -> the frozen CLIP text encoder's
    features: the pooled text embedding h(c) as ``vector`` (added to the UNet's time embedding) and the per-token
    features as ``context`` (cross-attention; Rombach et al. 2022, Sec. 3.3; GLIDE, Nichol et al. 2022, Sec. 2.3).
    While training each caption becomes the empty prompt with probability ``dropout``, so the net also learns the
    unconditional model of classifier-free guidance (Ho & Salimans 2022, Alg. 1).

    The encoder's weights are part of the model (frozen): its checkpoint keeps them.

    Args:
        encoder: The CLIP: a ``CLIPModule`` checkpoint (``configs/clip/fashion_mnist.yaml``), a ``clip.load`` file
            or a released model name.
        dropout: Probability of dropping a caption while training.
        pooled: Give the pooled embedding as ``vector`` (the net needs ``vector_dim`` = the CLIP's ``embed_dim``).
        tokens: Give the per-token features as ``context`` (the net needs ``context_dim`` = the CLIP's text width).
        prompts: Prompts of sample grids and FID (``example_batch``), cycled; default "a photo of a {class}" for the
            class names stored in a CLIPModule checkpoint.
    """

    def __init__(self, encoder: str, dropout: float = 0.1, pooled: bool = True, tokens: bool = True,
                 prompts: Sequence[str] | None = None) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"caption dropout must be in [0, 1), got {dropout}")
        if not (pooled or tokens):
            raise ValueError("Text conditioning needs pooled and/or tokens: set at least one to true")
        self.dropout, self.pooled, self.tokens = dropout, pooled, tokens
        net, entries = read_clip(encoder)
        self.encoder = net
        names = entries.get(CLASS_NAMES_KEY, [])
        self.example_prompts = list(prompts) if prompts else [f"a photo of a {name}" for name in names]

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("prompt",)

    def check_net(self, net: nn.Module) -> None:
        wanted = {"vector_dim": self.encoder.embed_dim if self.pooled else None,
                  "context_dim": self.encoder.model.transformer.width if self.tokens else None}
        for name, width in wanted.items():
            if getattr(net, name, None) != width:
                raise ConfigError(f"Text conditioning (pooled={self.pooled}, tokens={self.tokens}) needs a net with "
                                  f"{name}={width}; the net has {name}={getattr(net, name, None)}: set "
                                  f"model.init_args.net.init_args.{name}: {'null' if width is None else width}")

    def train(self, mode: bool = True) -> Text:
        """The encoder stays in eval mode (it is frozen)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def encode(self, texts: list[str]) -> NetKwargs:
        """The net's keyword arguments for ``texts`` (no gradient: the encoder is frozen)."""
        with torch.no_grad():
            features = self.encoder.text_features(texts)
        cond: NetKwargs = {}
        if self.pooled:
            cond["vector"] = features.pooled
        if self.tokens:
            cond["context"] = features.tokens
        return cond

    def forward(self, batch: dict[str, Any], *, training: bool, generator: torch.Generator | None = None) -> NetKwargs:
        texts = batch.get("caption", batch.get("prompt"))
        if texts is None:
            raise ConfigError("a text-conditional model needs a prompt per sample: predict "
                              "--data.init_args.predict.prompts='[\"a photo of a sneaker\"]'")
        texts = list(texts)
        if training and self.dropout > 0:
            drop = drop_mask((len(texts),), self.dropout, self.encoder.mean.device, generator).tolist()
            texts = [NULL_PROMPT if dropped else text for text, dropped in zip(texts, drop)]
        return self.encode(texts)

    def null(self, cond: NetKwargs) -> NetKwargs:
        batch = next(iter(cond.values())).shape[0]
        return {key: value.expand(batch, *value.shape[1:]) for key, value in self.encode([NULL_PROMPT]).items()}

    def example_batch(self, num_samples: int, device: torch.device | str,
                      real: Tensor | None = None) -> dict[str, Any]:
        """The example prompts cycled; the empty prompt (unconditional samples) when there are none."""
        prompts = self.example_prompts
        if not prompts:
            log.warning("Text conditioning has no example prompts (its CLIP names no classes): sample grids and FID "
                        "show the unconditional model; set the conditioner's prompts")
            prompts = [NULL_PROMPT]
        return {"prompt": [prompts[i % len(prompts)] for i in range(num_samples)]}
