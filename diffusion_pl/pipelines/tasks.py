"""What ``diffusion-pl predict`` does with a trained model: the ``predict_task`` part of ``DiffusionModule``.

Without a task, predict samples one image per seed. A task turns the predict batch (images of a split, see
``ImageDataModule(predict=SplitImages(...))``) into outputs: ``"samples"`` (uint8 (N, C, H, W), written to samples.npz),
``"panel"`` (uint8 (B, C, H, W * k): one row per item of grid.png, e.g. input | masked | result) and per-item entries.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.conditioning import set_sampling_level
from diffusion_pl.core.resize import upsample
from diffusion_pl.core.spec import Configurable
from diffusion_pl.core.tensors import to_uint8
from diffusion_pl.pipelines.inpainting import INPAINT_METHODS, InpaintMethod, inpaint
from diffusion_pl.pipelines.interpolation import interpolate, interpolate_ddim
from diffusion_pl.pipelines.masks import MASK_NAMES, load_mask, named_mask
from diffusion_pl.pipelines.model import GenerativeModel, SamplingModel, seeded_noise


def side_by_side(*columns: Tensor) -> Tensor:
    """(B, C, H, W) images of each column, one row per item: (B, C, H, W * k), a 2-pixel gray gap between."""
    gap = torch.full((*columns[0].shape[:3], 2), 128, dtype=torch.uint8)
    pieces = [piece for column in columns for piece in (column, gap)][:-1]
    return torch.cat(pieces, dim=3)


def require_images(batch: dict[str, Any], task: str) -> Tensor:
    if "image" not in batch:
        raise ValueError(f"{task} needs input images: predict from a split, --data.init_args.predict="
                         "diffusion_pl.data.SplitImages --data.init_args.predict.split=test (optionally "
                         "--data.init_args.predict.indices=[...]), or from files, diffusion_pl.data.ImageFiles")
    return batch["image"]


class PredictTask(Configurable, abc.ABC):
    """One use of a trained model at ``predict``."""

    @abc.abstractmethod
    def __call__(self, model: SamplingModel, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        """The outputs for ``batch``, on the CPU."""


class Inpaint(PredictTask):
    """Fill in a masked region of each input image (:func:`diffusion_pl.pipelines.inpaint`).

    Args:
        method: "replace", "repaint" or "x0".
        mask: A mask name ("left_half", "center_box", "random_boxes"; per-item random boxes from the item's seed).
        mask_file: A mask image instead (white = fill in), at the data's image size.
        box: Side of the erased box(es) of "center_box"/"random_boxes".
        steps: RePaint's respaced steps (default all T).
        jump_length: RePaint's jump length.
        resample: RePaint's resampling count.
        conditional: Condition a class-conditional model on the item's label (else unconditional).

    Text-guided inpainting: items with a ``"prompt"`` (``data.init_args.predict.prompts``) always pass it on, to a
    text-conditional model's conditioner (``Text``) or to CLIP guidance, and record it (``prompts`` in samples.npz).
    """

    def __init__(self, method: InpaintMethod = "replace", mask: str = "center_box", mask_file: str | None = None,
                 box: int | None = None, steps: int | None = None, jump_length: int = 10, resample: int = 10,
                 conditional: bool = False) -> None:
        if method not in INPAINT_METHODS:
            raise ValueError(f"unknown inpainting method {method!r}; choose one of {', '.join(INPAINT_METHODS)}")
        if mask_file is None and mask not in MASK_NAMES:
            raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASK_NAMES)} or give mask_file")
        self.method, self.mask, self.mask_file, self.box = method, mask, mask_file, box
        self.steps, self.jump_length, self.resample, self.conditional = steps, jump_length, resample, conditional

    def masks(self, batch: dict[str, Any], size: int) -> Tensor:
        """(B, 1, H, W) masks of the batch: the file's, or the named one (random boxes seeded per item)."""
        seeds = batch["seed"].tolist()
        if self.mask_file is not None:
            return load_mask(self.mask_file, size).expand(len(seeds), -1, -1, -1)
        return torch.cat([named_mask(self.mask, size, box=self.box, generator=torch.Generator().manual_seed(seed))
                          for seed in seeds])

    def __call__(self, model: SamplingModel, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        images = require_images(batch, "Inpaint")
        masks = self.masks(batch, images.shape[-1]).to(images)
        conditions = {"label": batch["label"]} if self.conditional else {}
        prompts = {"prompt": list(batch["prompt"])} if "prompt" in batch else {}
        out = inpaint(model, images, masks, method=self.method, batch={**conditions, **prompts}, generator=generator,
                      steps=self.steps, jump_length=self.jump_length, resample=self.resample)
        inputs, results = to_uint8(images).cpu(), to_uint8(out).cpu()
        masked = torch.where(masks.cpu().bool(), inputs, torch.full_like(inputs, 128))
        return {"samples": results, "panel": side_by_side(inputs, masked, results), "inputs": inputs,
                "masks": masks.cpu().to(torch.uint8), "label": batch["label"].cpu(), "index": batch["index"].cpu(),
                **prompts}


class SuperResolve(PredictTask):
    """Super-resolve each input image with a super-resolution stage (its ``LowResImage`` conditioner): the inputs
    are the low-res images (e.g. an ``ImageFiles`` predict input of 16x16 files for a 16 -> 32 stage).

    The output's prior noise and the input's augmentation noise come from each item's seed. The panel shows the
    input (nearest-neighbour upsampled), its bicubic upsampling and the model's output side by side.

    Args:
        sampling_level: The augmentation level of the inputs (default: the stage's own ``sampling_level``).
    """

    def __init__(self, sampling_level: float | None = None) -> None:
        self.sampling_level = sampling_level

    def __call__(self, model: GenerativeModel, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        low = require_images(batch, "SuperResolve")
        size = model.latent_shape[-1]
        if size % low.shape[-1]:
            raise ValueError(f"SuperResolve: the model makes {size}x{size} images, which the {low.shape[-1]}x"
                             f"{low.shape[-2]} inputs do not divide: give low-res images of the stage's input size")
        if self.sampling_level is not None:
            set_sampling_level(model, self.sampling_level, "SuperResolve")
        seeds = batch["seed"].tolist()
        noise = seeded_noise(model.process, model.latent_shape, seeds).to(model.device)
        out = model.sample(noise=noise, batch={"low_res": low, "seed": batch["seed"]}, generator=generator)
        inputs = to_uint8(upsample(low, size, "nearest")).cpu()
        bicubic = to_uint8(upsample(low, size, "bicubic")).cpu()
        results = to_uint8(out).cpu()
        return {"samples": results, "panel": side_by_side(inputs, bicubic, results), "low_res": to_uint8(low).cpu(),
                "label": batch["label"].cpu(), "index": batch["index"].cpu()}


class Interpolate(PredictTask):
    """Interpolate between consecutive pairs of input images (items 0-1, 2-3, ...).

    Args:
        lambdas: The mixing weights, in order.
        t: Start level as a fraction of the time range (stochastic interpolation; Ho et al. 2020 Sec. 4.3).
        deterministic: DDIM inversion + slerp + DDIM instead (``steps`` DDIM steps).
        steps: DDIM steps of the deterministic variant.
    """

    def __init__(self, lambdas: list[float] | None = None, t: float = 0.5, deterministic: bool = False,
                 steps: int = 50) -> None:
        self.lambdas = list(lambdas) if lambdas is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
        self.t, self.deterministic, self.steps = t, deterministic, steps

    def __call__(self, model: SamplingModel, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        images = require_images(batch, "Interpolate")
        if images.shape[0] % 2:
            raise ValueError(f"Interpolate pairs consecutive images, got an odd batch of {images.shape[0]}: make "
                             "data.init_args.predict.batch_size (and the number of images) even")
        lambdas = torch.tensor(self.lambdas)
        rows = []
        for x, x_prime in zip(images[0::2], images[1::2]):
            if self.deterministic:
                rows.append(interpolate_ddim(model, x, x_prime, lambdas, steps=self.steps))
            else:
                rows.append(interpolate(model, x, x_prime, lambdas, self.t, generator=generator))
        frames = to_uint8(torch.stack(rows)).cpu()  # (P, L, C, H, W)
        ends = to_uint8(images).cpu()
        panel = side_by_side(ends[0::2], *frames.unbind(1), ends[1::2])
        pairs = batch["label"].cpu().reshape(-1, 2)
        return {"samples": frames.flatten(0, 1), "panel": panel, "lambda": lambdas.repeat(len(rows)),
                "label": pairs[:, 0].repeat_interleave(len(lambdas)),
                "label_b": pairs[:, 1].repeat_interleave(len(lambdas))}
