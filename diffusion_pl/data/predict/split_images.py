"""Inpainting, interpolation, super-resolution of a split's images: one predict item per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from diffusion_pl.core.tensors import from_uint8
from diffusion_pl.data.images import Images
from diffusion_pl.data.predict.base import PredictData, PredictInput
from diffusion_pl.data.sources.base import Split


class PredictImageDataset(Dataset):
    """Images to predict from (inpainting, interpolation): ``{"seed": start + position, "image": in [-1, 1], "label":
    its class, "index": its index in the images}`` for each of ``indices`` in order, with ``"prompt": prompts[position
    % len(prompts)]`` when prompts are given (text-guided inpainting)."""

    def __init__(self, data: Images, indices: Sequence[int], start: int = 0, prompts: Sequence[str] = ()) -> None:
        bad = [i for i in indices if not 0 <= i < len(data)]
        if bad:
            raise ValueError(f"the predict indices {bad} are outside the {len(data)} images")
        self.data, self.indices, self.start, self.prompts = data, list(indices), start, list(prompts)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        item: dict[str, Any] = {"seed": torch.tensor(self.start + position, dtype=torch.int64),
                                "image": from_uint8(self.data.image(index)),
                                "label": torch.tensor(int(self.data.labels[index]), dtype=torch.int64),
                                "index": torch.tensor(index, dtype=torch.int64)}
        if self.prompts:
            item["prompt"] = self.prompts[position % len(self.prompts)]
        return item


class SplitImages(PredictInput):
    """Images of a split of the data module's source, in its image format (``model.init_args.predict_task`` says
    what to do with them).

    Args:
        split: ``"train"`` or ``"test"``.
        num: Number of images (the first ones) when ``indices`` is not given.
        indices: Which images of the split, in order.
        seed: Seed of the first item.
        prompts: Text prompts, cycled (text-guided inpainting).
        batch_size: Batch size of the predict loader (default: the data module's ``batch_size``).
    """

    def __init__(self, split: Split = "test", num: int = 64, indices: list[int] | None = None, seed: int = 0,
                 prompts: list[str] | None = None, batch_size: int | None = None) -> None:
        if num < 1:
            raise ValueError(f"SplitImages num must be >= 1, got {num}: set --data.init_args.predict.num=N")
        super().__init__(seed, prompts, batch_size)
        self.split, self.num, self.indices = split, num, indices

    def dataset(self, data: PredictData) -> PredictImageDataset:
        images = data.load(self.split)
        if images is None:
            raise ValueError(f"the data has no {self.split!r} split to predict from: set "
                             "--data.init_args.predict.split=train")
        indices = self.indices or range(min(self.num, len(images)))
        return PredictImageDataset(images, indices, self.seed, self.prompts)
