"""Lazy image folder: files listed at setup and decoded in the loader workers, image for image what the in-memory
source holds (same resize, crop, channels, downsampling, captions and validation hold-out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pl.data import ImageDataModule, ImageFolder, ImageFormat, LazyImageFolder
from diffusion_pl.data import format as image_format


def make_split_folder(root: Path) -> Path:
    """root/train and root/test with two classes of random images of varied sizes; some captions."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("ant", "bee"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (rng.integers(6, 20), rng.integers(6, 20))
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
                if i == 1:
                    (folder / f"{i}.txt").write_text(f"the {name} {split}")
    return root


def equal_items(a: torch.utils.data.Dataset, b: torch.utils.data.Dataset) -> None:
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]), i
        assert (x["label"], x["caption"]) == (y["label"], y["caption"]), i


@pytest.mark.parametrize("options", [
    {"image_size": 8, "channels": 3, "resize_mode": "resize"},
    {"image_size": 16, "channels": 1, "resize_mode": "pad"},
    {"image_size": 4, "channels": 3, "resize_mode": "resize", "downsample": 2, "downsample_mode": "bilinear"},
])
def test_lazy_folder_equals_in_memory_image_for_image(tmp_path: Path, options: dict) -> None:
    root = str(make_split_folder(tmp_path))
    memory = ImageDataModule(ImageFolder(root), ImageFormat(**options), val_fraction=0.25)
    lazy = ImageDataModule(ImageFolder(root, lazy=True), ImageFormat(**options), val_fraction=0.25)
    for dm in (memory, lazy):
        dm.setup(None)
    assert isinstance(lazy.train_set.data, LazyImageFolder)
    for split in ("train_set", "val_set", "test_set"):
        equal_items(getattr(lazy, split), getattr(memory, split))
    captions = {lazy.train_set[i]["caption"] for i in range(len(lazy.train_set))} | \
        {lazy.val_set[i]["caption"] for i in range(len(lazy.val_set))}
    assert {"the ant train", "the bee train", "a photo of a ant"} <= captions
    assert lazy.example_images(3).shape == (3, options["channels"], options["image_size"], options["image_size"])


def test_lazy_folder_decodes_in_the_loader_workers_not_at_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    root = str(make_split_folder(tmp_path))
    rgb8 = ImageFormat(image_size=8, channels=3)
    memory = ImageDataModule(ImageFolder(root), rgb8, batch_size=4, num_workers=2)
    memory.setup("fit")
    lazy = ImageDataModule(ImageFolder(root, lazy=True), rgb8, batch_size=4, num_workers=2)
    decode = image_format.decode_image

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image was decoded at setup")

    monkeypatch.setattr(image_format, "decode_image", no_decode)
    lazy.setup("fit")
    monkeypatch.setattr(image_format, "decode_image", decode)
    for a, b in zip(lazy.train_dataloader(), memory.train_dataloader(), strict=True):  # same seeded order
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
