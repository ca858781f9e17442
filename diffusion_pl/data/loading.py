"""Batches of a split held in memory or read from files: the dataset view and its loaders, the training one exactly
resumable and sharded by rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.core.tensors import from_uint8
from diffusion_pl.data.images import Images
from diffusion_pl.data.sampler import ResumableDataLoader, ResumableSampler


class ImageDataset(Dataset):
    """uint8 images (in memory, or files decoded when read) served as ``{"image": float in [-1, 1], "label": int,
    "caption": str}``.

    Args:
        data: The split (uint8 images at the final size and channel count).
        caption_template: Format string filled with the class name, e.g. ``"a photo of a {}"``, for images without
            a caption of their own.
    """

    def __init__(self, data: Images, caption_template: str = "a photo of a {}") -> None:
        self.data = data
        self.captions = [caption_template.format(name) for name in data.class_names]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.data.labels[index])
        image = from_uint8(self.data.image(index))
        return {"image": image, "label": label, "caption": self.data.caption(index) or self.captions[label]}


@dataclass(frozen=True)
class Batching:
    """How a data module batches, on this process.

    Attributes:
        batch_size: Images per batch and process.
        num_workers: DataLoader worker processes (persistent when > 0).
        seed: Seed of the training order (with the epoch) and of the loaders' worker seeds (with the rank).
        world_size: Number of processes.
        rank: This process's global rank.
    """

    batch_size: int
    num_workers: int
    seed: int
    world_size: int = 1
    rank: int = 0

    @property
    def pin_memory(self) -> bool:
        return torch.cuda.is_available()

    def loader_options(self) -> dict[str, Any]:
        """Common DataLoader options. The loader's own generator supplies the per-iterator base seed, which a
        DataLoader otherwise draws from the global RNG at every new epoch or evaluation, shifting the noise of
        the training steps after it (and so breaking exact resume across epoch boundaries)."""
        generator = torch.Generator().manual_seed(self.seed + self.rank)
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                "pin_memory": self.pin_memory, "generator": generator}


def train_loader(dataset: Dataset, batching: Batching) -> DataLoader:
    """Shuffled, sharded by rank, ``drop_last``; the order depends only on (seed, epoch) and resumes exactly."""
    sampler = ResumableSampler(dataset, num_replicas=batching.world_size, rank=batching.rank, shuffle=True,
                               seed=batching.seed, drop_last=True)
    if len(sampler) < batching.batch_size:
        raise ValueError(
            f"each of {batching.world_size} process(es) gets {len(sampler)} training images, fewer than "
            f"batch_size={batching.batch_size}, so no full batch exists; lower data.batch_size"
        )
    return ResumableDataLoader(dataset, batch_size=batching.batch_size, sampler=sampler, drop_last=True,
                               **batching.loader_options())


def eval_loader(dataset: Dataset, batching: Batching) -> DataLoader:
    """Plain in-order loader; Lightning shards it with a DistributedSampler under DDP."""
    return DataLoader(dataset, batch_size=batching.batch_size, shuffle=False, **batching.loader_options())
