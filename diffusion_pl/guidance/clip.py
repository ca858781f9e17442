"""CLIP guidance (GLIDE, Nichol et al. 2022, Sec. 2.4; Crowson's CLIP-guided diffusion): follow the gradient of the
CLIP similarity between a prompt and the image being sampled.

GLIDE shifts the reverse mean: mu_hat(x_t, t, c) = mu_theta(x_t, t) + s Sigma_theta(x_t, t) grad_x sim(h(c), g(x_t)).
Here the same term acts in score form, so that it works with every sampler (DDPM, DDIM, SDE, ODE):

    eps' = eps - s sigma(t) grad_{x_t} log p(c | x_t),     log p(c | x_t) = tau cos(g(view), h(c)),

with tau = exp(logit_scale) of the CLIP. For a DDPM step the two forms agree up to the scale: the posterior mean
mu = (x_t - beta_t / sigma_t eps) / sqrt(alpha_t) of eps' is mu + s beta_t / sqrt(alpha_t) grad, i.e. GLIDE's mean
shift with Sigma = beta_t and scale s_GLIDE = s / sqrt(alpha_t) (about s, as alpha_t = 1 - beta_t is near 1); with
Sigma = beta-tilde_t, s_GLIDE = s (1 - alpha-bar_t) / ((1 - alpha-bar_{t-1}) sqrt(alpha_t)).

Two views: ``"x_t"``, a noised CLIP (trained on x_t, embedding t) reads the noisy sample itself (GLIDE); ``"x0"``, a
clean CLIP reads the denoiser's prediction x0_hat(x_t), and the gradient flows back through the denoiser.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_pl.core.errors import CheckpointMismatchError, ConfigError
from diffusion_pl.core.tensors import append_dims, mean_except_batch
from diffusion_pl.guidance.parts import PROCESS_MARGINALS_KEY, Guidance
from diffusion_pl.nets.clip import CLASS_NAMES_KEY, CLIPNet, read_clip
from diffusion_pl.parameterization import (
    ConditionalDenoiseFn,
    DenoiseFn,
    Prediction,
    x0_from_guided_eps,
)
from diffusion_pl.processes.base import ForwardProcess, marginals_mismatch

log = logging.getLogger(__name__)

View = Literal["x0", "x_t"]


class ImageEncoder(Protocol):
    """What CLIP guidance needs of a CLIP: image embeddings (of x_t at network time t, or of clean images when t is
    None) and the inverse temperature tau (``CLIPNet`` is one)."""

    logit_scale: Tensor

    def encode_image(self, images: Tensor, t: Tensor | None = None) -> Tensor: ...


@dataclass(frozen=True)
class Cutouts:
    """Random square crops of the view, each resized back to the view's size, whose CLIP similarities are averaged
    (Crowson's cutouts: for images larger than CLIP's input, a less adversarial gradient).

    The crops are drawn from a generator seeded by ``seed`` and the step's time, so a sample depends only on its
    seed and the step, not on the batch it is in (all samples of a step share the crops).

    Attributes:
        count: Crops per image.
        min_fraction: Smallest crop side as a fraction of the image's shorter side (the largest is the whole side).
        seed: Seed of the crop positions and sizes.
    """

    count: int
    min_fraction: float = 0.5
    seed: int = 0

    def __call__(self, images: Tensor, t: Tensor) -> Tensor:
        """(count, B, C, H, W) crops of ``images`` (B, C, H, W) at the step of time ``t``."""
        generator = torch.Generator().manual_seed(hash((self.seed, round(float(t.flatten()[0]), 6))) % (1 << 62))
        height, width = images.shape[-2:]
        side = min(height, width)
        crops = []
        for _ in range(self.count):
            size = int(side * (self.min_fraction + (1 - self.min_fraction) * torch.rand((), generator=generator)))
            size = max(1, size)
            top = int(torch.randint(height - size + 1, (), generator=generator))
            left = int(torch.randint(width - size + 1, (), generator=generator))
            crop = images[..., top:top + size, left:left + size]
            crops.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False))
        return torch.stack(crops)


def total_variation(images: Tensor) -> Tensor:
    """Per-sample mean squared difference of horizontally and vertically adjacent pixels (Crowson's TV loss)."""
    x = F.pad(images, (0, 1, 0, 1), mode="replicate")
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return mean_except_batch(dx**2 + dy**2)


def range_penalty(images: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Per-sample mean squared distance of the pixels to the data range [low, high] (Crowson's range loss)."""
    return mean_except_batch((images - images.clamp(low, high)) ** 2)


def clip_log_prob(clip: ImageEncoder, images: Tensor, text_features: Tensor, *, net_time: Tensor | None = None,
                  cutouts: Cutouts | None = None, step: Tensor | None = None) -> Tensor:
    """log p(c | x) = tau cos(g(x), h(c)) per sample (GLIDE's sim, scaled by CLIP's inverse temperature).

    Args:
        clip: The CLIP.
        images: What it reads (B, ...): clean images, or x_t for a noised CLIP given ``net_time``.
        text_features: h(c) per sample (B, D).
        net_time: The network time of x_t (a noised CLIP); None for clean images.
        cutouts: Average over random crops of the images (None: the whole images).
        step: The sampler's time, which sets the crops' positions.
    """
    h = F.normalize(text_features.float(), dim=-1)
    if cutouts is None or cutouts.count == 0:
        return clip.logit_scale * (F.normalize(clip.encode_image(images, net_time).float(), dim=-1) * h).sum(-1)
    crops = cutouts(images, step if step is not None else torch.zeros(1))
    count, batch = crops.shape[:2]
    t_crops = None if net_time is None else net_time.repeat(count)
    g = F.normalize(clip.encode_image(crops.flatten(0, 1), t_crops).float(), dim=-1).view(count, batch, -1)
    return clip.logit_scale * (g * h).sum(-1).mean(0)


def clip_guidance(den: DenoiseFn, clip: ImageEncoder, text_features: Tensor, process: ForwardProcess, scale: float,
                  *, view: View = "x0", cutouts: Cutouts | None = None, tv_weight: float = 0.0,
                  range_weight: float = 0.0) -> DenoiseFn:
    """eps' = eps - s sigma(t) grad_{x_t} [tau cos(g(view), h(c)) - w_tv TV(view) - w_range R(view)] (module docstring).

    The gradient is taken in float32 with autograd on, also inside Lightning's inference-mode ``predict``. With
    ``view="x0"`` the denoiser runs once, with autograd, and its prediction is reused.

    Args:
        den: The denoiser to guide.
        clip: The CLIP (a noised one for ``view="x_t"``, getting ``process.net_input_time(t)``; a clean one for x0).
        text_features: h(c) per sample (B, D), computed outside inference mode.
        process: The sampler's process (sigma(t), network time).
        scale: Guidance scale s (0: no guidance).
        view: What CLIP sees: the noisy sample ``"x_t"`` or the predicted clean image ``"x0"``.
        cutouts: Average the similarity over random crops (None: the whole view).
        tv_weight: Weight of the total-variation penalty on the view (Crowson).
        range_weight: Weight of the penalty on pixels outside [-1, 1] (Crowson).
    """
    if view not in ("x0", "x_t"):
        raise ValueError(f"CLIP guidance view must be 'x0' or 'x_t', got {view!r}")

    def objective(x_t: Tensor, t: Tensor) -> tuple[Tensor, Prediction | None]:
        if view == "x0":
            pred = den(x_t, t)
            image, net_time = pred.x0, None
        else:
            pred, image, net_time = None, x_t, process.net_input_time(t)
        value = clip_log_prob(clip, image, text_features, net_time=net_time, cutouts=cutouts, step=t)
        if tv_weight:
            value = value - tv_weight * total_variation(image)
        if range_weight:
            value = value - range_weight * range_penalty(image)
        return value, pred

    def guided(x_t: Tensor, t: Tensor) -> Prediction:
        if scale == 0:
            return den(x_t, t)
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().float().clone().requires_grad_(True)
            value, pred = objective(x, t.clone())
            (grad,) = torch.autograd.grad(value.sum(), x)
        pred = den(x_t, t) if pred is None else _detached(pred)
        eps = pred.eps - scale * append_dims(process.sigma(t), x_t.ndim) * grad.to(pred.eps.dtype)
        return Prediction(x0=x0_from_guided_eps(eps, x_t, t, process, pred.x0), eps=eps, log_var=pred.log_var)

    return guided


def _detached(pred: Prediction) -> Prediction:
    return Prediction(x0=pred.x0.detach(), eps=pred.eps.detach(),
                      log_var=None if pred.log_var is None else pred.log_var.detach())


def check_prompts(prompts: Sequence[str], where: str) -> list[str]:
    """The prompts of CLIP guidance as a list; an empty (or blank) one, whose guidance means nothing, is refused
    (the message says it is in ``where``)."""
    blank = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
    if blank:
        raise ConfigError(f"CLIP guidance got an empty prompt at position(s) {blank[:8]} of {where}: it guides towards "
                          "nothing. Give every sample a prompt, or sample without a prompt with no guidance (leave "
                          "diffusion_pl.guidance.CLIP out of model.init_args.guidance)")
    return list(prompts)


class CLIP(Guidance):
    """CLIP guidance towards ``batch["prompt"]`` (predict: ``--data.init_args.predict.prompts='["a photo of a
    sneaker"]'``), eps' = eps - s sigma(t) grad log p(c | x_t) with log p = tau cos (:func:`clip_guidance`).

    Args:
        model: The CLIP: a ``CLIPModule`` checkpoint (``configs/clip/fashion_mnist.yaml``; its noised variant for
            ``view="x_t"``), a ``clip.load`` file, or a released model name (cached, or downloaded when online).
        scale: Guidance scale s.
        view: ``"x0"``: a clean CLIP reads the denoiser's x0 prediction (gradient through the denoiser); ``"x_t"``:
            a noised CLIP, trained on this model's forward process, reads x_t.
        prompts: Prompts of sample grids and FID (``example_batch``), cycled; default "a photo of a {class}" for the
            class names stored in a CLIPModule checkpoint.
        cutouts: Random crops whose similarities are averaged (0: the whole image).
        cutout_min_fraction: Smallest crop side, as a fraction of the image side.
        tv_weight: Weight of the total-variation penalty on the view.
        range_weight: Weight of the out-of-range penalty on the view.
        seed: Seed of the cutouts.
    """

    def __init__(self, model: str, scale: float = 1.0, view: View = "x0", prompts: Sequence[str] | None = None,
                 cutouts: int = 0, cutout_min_fraction: float = 0.5, tv_weight: float = 0.0,
                 range_weight: float = 0.0, seed: int = 0) -> None:
        if view not in ("x0", "x_t"):
            raise ConfigError(f"CLIP guidance view must be 'x0' (clean CLIP on the predicted x0) or 'x_t' (noised CLIP "
                              f"on the noisy sample), got {view!r}")
        if cutouts < 0 or not 0 < cutout_min_fraction <= 1:
            raise ConfigError(f"cutouts must be >= 0 and cutout_min_fraction in (0, 1], got {cutouts}, "
                              f"{cutout_min_fraction}")
        self.model, self.scale, self.view = model, scale, view
        self.prompts = check_prompts(prompts or [], "its prompts")
        self.cutouts = Cutouts(cutouts, cutout_min_fraction, seed) if cutouts else None
        self.tv_weight, self.range_weight = tv_weight, range_weight
        self._net: CLIPNet | None = None
        self._class_names: list[str] = []

    def prepare(self, process: ForwardProcess, device: torch.device) -> None:
        """Load the CLIP once (frozen, float32) and check that it can read the chosen view of this process."""
        if self._net is None:
            with torch.inference_mode(False):  # predict runs in inference mode, and guidance backpropagates
                net, entries = read_clip(self.model)
            self._check(net, entries.get(PROCESS_MARGINALS_KEY), process)
            self._net, self._class_names = net, list(entries.get(CLASS_NAMES_KEY, []))
        with torch.inference_mode(False):
            self._net.to(device)

    def _check(self, net: CLIPNet, marginals: dict[str, Tensor] | None, process: ForwardProcess) -> None:
        """A clean CLIP cannot read x_t, a noised one needs t; a noised one must know this model's process."""
        if self.view == "x_t" and not net.time_conditional:
            raise ConfigError(f"CLIP {self.model} is a clean CLIP: it cannot read noisy x_t. Guide its x0 view (view: "
                              "x0) or train a noised CLIP (configs/clip/fashion_mnist_noised.yaml)")
        if self.view == "x0" and net.time_conditional:
            raise ConfigError(f"CLIP {self.model} is a noised CLIP (it embeds t): guide with view: x_t, or give a "
                              "clean CLIP (configs/clip/fashion_mnist.yaml) for view: x0")
        if self.view == "x_t" and marginals is not None:
            mismatch = marginals_mismatch(marginals, process.marginals())
            if mismatch is not None:
                raise CheckpointMismatchError(
                    f"noised CLIP {self.model} was trained on x_t of another forward process than this model's "
                    f"({mismatch}): train it with model.init_args.process as in this model's config")

    @property
    def net(self) -> CLIPNet:
        if self._net is None:
            raise RuntimeError("CLIP guidance used before prepare(process, device) loaded its CLIP")
        return self._net

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("prompt",)

    def example_batch(self, num_samples: int, device: torch.device | str) -> dict[str, Any]:
        """Prompts cycling through ``prompts`` or "a photo of a {class}" for the CLIP's classes."""
        prompts = self.prompts or [f"a photo of a {name}" for name in self._class_names]
        if not prompts:
            raise ConfigError(f"CLIP guidance has no prompts for sample grids: CLIP {self.model} stores no class "
                              "names; set the part's prompts")
        return {"prompt": [prompts[i % len(prompts)] for i in range(num_samples)]}

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """h(c) of each prompt, a normal tensor (not an inference tensor) that autograd may save."""
        with torch.inference_mode(False), torch.no_grad():
            return self.net.encode_text(list(prompts))

    def wrap(self, denoise: ConditionalDenoiseFn, *, batch: dict[str, Any], cond: dict[str, Tensor],
             null: dict[str, Tensor], process: ForwardProcess) -> DenoiseFn:
        if "prompt" not in batch:
            raise ConfigError("CLIP guidance needs a prompt per sample: predict --data.init_args.predict.prompts="
                              "'[\"a photo of a sneaker\"]'")
        prompts = check_prompts(batch["prompt"], "the batch's prompts (data.init_args.predict.prompts)")
        return clip_guidance(denoise, self.net, self.text_features(prompts), process, self.scale,
                             view=self.view, cutouts=self.cutouts, tv_weight=self.tv_weight,
                             range_weight=self.range_weight)
