"""The CLIP score of images with their prompts: the mean cosine between CLIP's image and text embeddings (Radford et
al. 2021; Hessel et al. 2021's CLIPScore is 2.5 max(cos, 0), torchmetrics' 100 max(cos, 0), of the same cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_pl.metrics.features import model_range
from diffusion_pl.nets.clip import CLIPNet


@torch.no_grad()
def prompt_cosines(net: CLIPNet, images: Tensor, prompts: list[str], batch_size: int = 250) -> Tensor:
    """cos(g(x_i), h(c_i)) of each image (uint8, or float in [-1, 1]) and its prompt, (N,) on the CPU."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    device = net.mean.device
    cosines = []
    for start in range(0, len(images), batch_size):
        batch = model_range(images[start:start + batch_size]).to(device)
        text = net.encode_text(prompts[start:start + batch_size])
        cosines.append(F.cosine_similarity(net.encode_image(batch), text).cpu())
    return torch.cat(cosines)


def clip_score(net: CLIPNet, images: Tensor, prompts: list[str], batch_size: int = 250) -> float:
    """The mean of :func:`prompt_cosines`."""
    return float(prompt_cosines(net, images, prompts, batch_size).mean())
