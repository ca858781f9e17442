"""Sampling: one predict item per seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from diffusion_pl.data.predict.base import PredictData, PredictInput


class SeedDataset(Dataset):
    """``num_samples`` items ``{"seed": start + index, "label": labels[index % len(labels)]}``, with
    ``"prompt": prompts[index % len(prompts)]`` when prompts are given: the model's predict_step makes its noise from
    the seed and, for conditional or guided models, targets the label or the prompt."""

    def __init__(self, num_samples: int, start: int = 0, labels: Sequence[int] = (0,),
                 prompts: Sequence[str] = ()) -> None:
        self.num_samples, self.start, self.labels, self.prompts = num_samples, start, list(labels), list(prompts)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"seed": torch.tensor(self.start + index, dtype=torch.int64),
                                "label": torch.tensor(self.labels[index % len(self.labels)], dtype=torch.int64)}
        if self.prompts:
            item["prompt"] = self.prompts[index % len(self.prompts)]
        return item


class Seeds(PredictInput):
    """``num`` samples from the seeds ``seed, seed + 1, ...``: an image depends only on its seed (and label/prompt).

    Args:
        num: Number of samples.
        seed: First noise seed.
        labels: Target labels of the samples, cycled (default: every class in turn).
        prompts: Text prompts of the samples, cycled (CLIP guidance, text-conditional models).
        batch_size: Batch size of the predict loader (default: the data module's ``batch_size``).
    """

    def __init__(self, num: int = 64, seed: int = 0, labels: list[int] | None = None,
                 prompts: list[str] | None = None, batch_size: int | None = None) -> None:
        if num < 1:
            raise ValueError(f"Seeds num must be >= 1 (the number of images predict writes), got {num}: set "
                             "--data.init_args.predict.num=N")
        super().__init__(seed, prompts, batch_size)
        self.num, self.labels = num, labels

    def dataset(self, data: PredictData) -> SeedDataset:
        num_classes = len(data.class_names)
        labels = self.labels if self.labels else range(num_classes)
        if any(not 0 <= label < num_classes for label in labels):
            raise ValueError(f"the predict labels must lie in 0..{num_classes - 1} ({data.class_names}), got "
                             f"{labels}: set --data.init_args.predict.labels=[...]")
        return SeedDataset(self.num, self.seed, labels, self.prompts)
