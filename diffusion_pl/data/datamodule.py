"""ImageDataModule: one LightningDataModule for every model family (diffusion, classifiers, CLIP, autoencoders)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.core.errors import ConfigError
from diffusion_pl.core.resize import DownsampleMode
from diffusion_pl.core.seeds import derived_seed
from diffusion_pl.core.tensors import append_dims, from_uint8
from diffusion_pl.data.predict_inputs import load_predict_images
from diffusion_pl.data.sampler import ResumableDataLoader, ResumableSampler
from diffusion_pl.data.sources import (
    ROOTED_SOURCES,
    ImageData,
    LazyImageFolder,
    check_image_args,
    check_source,
    holdout_indices,
    load_split,
    prepare_source,
    source_class_names,
)

log = logging.getLogger(__name__)



class ImageDataset(Dataset):
    """uint8 images (in memory, or files decoded when read) served as ``{"image": float in [-1, 1], "label": int,
    "caption": str}``.

    Args:
        data: The split (uint8 images at the final size and channel count).
        caption_template: Format string filled with the class name, e.g. ``"a photo of a {}"``, for images without
            a caption of their own.
    """

    def __init__(self, data: ImageData | LazyImageFolder, caption_template: str = "a photo of a {}") -> None:
        self.data = data
        self.captions = [caption_template.format(name) for name in data.class_names]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.data.labels[index])
        image = from_uint8(self.data.image(index))
        return {"image": image, "label": label, "caption": self.data.caption(index) or self.captions[label]}


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


class PredictImageDataset(Dataset):
    """Images of a split to predict from (inpainting, interpolation): ``{"seed": start + position, "image": in
    [-1, 1], "label": its class, "index": its index in the split}`` for each of ``indices`` in order, with
    ``"prompt": prompts[position % len(prompts)]`` when prompts are given (text-guided inpainting)."""

    def __init__(self, data: ImageData, indices: Sequence[int], start: int = 0, prompts: Sequence[str] = ()) -> None:
        bad = [i for i in indices if not 0 <= i < len(data)]
        if bad:
            raise ValueError(f"predict_indices {bad} are outside the split's {len(data)} images")
        self.data, self.indices, self.start, self.prompts = data, list(indices), start, list(prompts)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        item: dict[str, Any] = {"seed": torch.tensor(self.start + position, dtype=torch.int64),
                                "image": from_uint8(self.data.images[index]),
                                "label": torch.tensor(int(self.data.labels[index]), dtype=torch.int64),
                                "index": torch.tensor(index, dtype=torch.int64)}
        if self.prompts:
            item["prompt"] = self.prompts[position % len(self.prompts)]
        return item


def _split_off(data: ImageData | LazyImageFolder, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split a seeded random ``fraction`` of ``data`` off (returned second); the same seed gives the same split."""
    keep, held = holdout_indices(len(data), fraction, seed)
    return data.subset(keep), data.subset(held)


class ImageDataModule(L.LightningDataModule):
    """Image data for every model: batches ``{"image": (B, C, H, W) in [-1, 1], "label": long, "caption": list[str]}``.

    Training order is exactly resumable (:class:`ResumableDataLoader`/:class:`ResumableSampler`, saved in the
    checkpoint by Lightning); the optional horizontal flip is a batched augmentation applied after the
    batch reaches the device, driven by seeds that this datamodule's ``state_dict`` restores.

    Args:
        source: Dataset source, one of ``fashion_mnist``, ``mnist``, ``cifar10``, ``image_folder``, ``digits``, or
            ``streaming``: a dataset converted by ``tools/convert_dataset.py``, streamed through LitData (every rank
            its own shard; its ``val`` split was held out at conversion, so ``val_fraction`` does not apply).
        root: Local folder of the data (required for ``image_folder``; optional elsewhere); for ``streaming``, the
            converted directory or its object-store URL (``s3://...``).
        image_size: Side length every image is converted to once at load.
        channels: 1 (grayscale) or 3 (RGB).
        resize_mode: ``"pad"`` smaller images with black (Fashion-MNIST 28 -> 32) or ``"resize"`` + center-crop.
        downsample: Fit images to ``image_size * downsample`` first, then reduce them by this factor with
            ``downsample_mode``: the low-resolution data of a cascade's base stage, the same images as the
            ``LowResImage(factor=downsample)`` condition of its super-resolution stage.
        downsample_mode: ``"area"`` (block average) or ``"bilinear"`` (antialiased), as in ``LowResImage``.
        random_flip: Flip training images horizontally with probability 1/2.
        val_fraction: Fraction of the train split held out (seeded, fixed) for validation, in [0, 1).
        batch_size: Batch size per process for train/val/test.
        num_workers: DataLoader worker processes (persistent when > 0).
        seed: Seed of the validation split, the training order and the flips.
        download: Allow downloading the data (torchvision) when no local copy exists.
        lazy_decode: ``image_folder`` only: decode each file when it is read, in the loader workers, instead of the
            whole split into memory at setup (large folders; in memory is faster for small ones).
        caption_template: Caption made from the class name, e.g. ``"a photo of a {}"``.
        predict_num_samples: Number of items ``{"seed": predict_seed + i}`` the predict loader yields.
        predict_seed: First noise seed for prediction.
        predict_batch_size: Batch size of the predict loader (default ``batch_size``).
        predict_labels: Target labels of the predicted samples, cycled (default: every class in turn).
        predict_prompts: Text prompts of the predicted samples, cycled (CLIP guidance, text-conditional models).
        predict_from: "seeds" (sampling: one seed per item), the split ("train", "test") whose images the predict
            items carry (inpainting, interpolation, super-resolution: ``model.init_args.predict_task``), or
            "images": the files of ``predict_images``.
        predict_indices: Which images of that split, in order (default: the first ``predict_num_samples``).
        predict_images: A folder of image files (name order) or an .npz (``images`` or ``samples``, uint8
            N x H x W x C, optional ``labels``) read at their own size; setting it implies ``predict_from="images"``.
    """

    def __init__(
        self,
        source: str = "fashion_mnist",
        root: str | None = None,
        image_size: int = 32,
        channels: int = 1,
        resize_mode: Literal["pad", "resize"] = "pad",
        downsample: int = 1,
        downsample_mode: DownsampleMode = "area",
        random_flip: bool = False,
        val_fraction: float = 0.05,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = True,
        lazy_decode: bool = False,
        caption_template: str = "a photo of a {}",
        predict_num_samples: int = 64,
        predict_seed: int = 0,
        predict_batch_size: int | None = None,
        predict_labels: list[int] | None = None,
        predict_prompts: list[str] | None = None,
        predict_from: Literal["seeds", "train", "test", "images"] = "seeds",
        predict_indices: list[int] | None = None,
        predict_images: str | None = None,
    ) -> None:
        super().__init__()
        check_source(source)
        check_image_args(image_size, channels, resize_mode)
        if downsample < 1:
            raise ValueError(f"downsample must be a whole factor >= 1 (1: full resolution), got {downsample}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1) (the fraction of the train split held out), got {val_fraction}"
            )
        if batch_size < 1 or (predict_batch_size is not None and predict_batch_size < 1):
            raise ValueError(
                f"batch sizes must be >= 1, got batch_size={batch_size}, predict_batch_size={predict_batch_size}"
            )
        if predict_num_samples < 1:
            raise ValueError(f"predict_num_samples must be >= 1 (the number of images predict writes), got "
                             f"{predict_num_samples}: set data.init_args.predict_num_samples=N")
        if source in ROOTED_SOURCES and root is None:
            what = "a folder of images (one subfolder per class)" if source == "image_folder" else \
                "the directory written by tools/convert_dataset.py"
            raise ValueError(f"source {source!r} needs data.root: pass `data.root=PATH`, {what}")
        if lazy_decode and source != "image_folder":
            raise ValueError(f"lazy_decode applies to source 'image_folder' only, not {source!r}: remove "
                             "data.init_args.lazy_decode (a converted dataset streams with source 'streaming')")
        if predict_from == "images" and predict_images is None:
            raise ValueError("predict_from='images' needs data.init_args.predict_images=PATH (a folder of images or "
                             "an .npz)")
        self.save_hyperparameters(logger=False)  # the model logs the run's hyperparameters with its metrics
        self._class_names: tuple[str, ...] | None = None
        self.train_set: Dataset | None = None  # an ImageDataset, or a StreamingImageDataset (source 'streaming')
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._flip_batches = 0
        self._flip_generator = torch.Generator()

    # ------------------------------------------------------------------------------------------- metadata

    @property
    def class_names(self) -> list[str]:
        """Class names in label order, known without loading images (image_folder lists its subfolders)."""
        if self._class_names is None:
            self._class_names = source_class_names(self.hparams.source, self.hparams.root)
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes; link it to the model's ``num_classes``."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, image_size, image_size) of every image."""
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) of the attached trainer, or (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    # ------------------------------------------------------------------------------------------- loading

    def prepare_data(self) -> None:
        """Download the data when needed and allowed (runs on one process)."""
        prepare_source(self.hparams.source, self.hparams.root, self.hparams.download)

    def load(self, split: Literal["train", "test"], lazy: bool = False) -> ImageData | LazyImageFolder | None:
        """The whole ``split`` at this module's image format (None when the source has no such split); ``lazy``: an
        image folder's files, decoded when read."""
        hp = self.hparams
        data = load_split(
            hp.source, split, root=hp.root, image_size=hp.image_size * hp.downsample, channels=hp.channels,
            resize_mode=hp.resize_mode, download=hp.download, lazy=lazy,
        )
        if data is not None and hp.downsample > 1:
            data = data.downsampled(hp.downsample, hp.downsample_mode)
        return data

    def _stream(self, split: str, shuffle: bool = False) -> Dataset:
        """A split of a converted dataset, streamed (an empty split when the dataset has none)."""
        from diffusion_pl.data.streaming import (  # imports litdata when used
            StreamingImageDataset,
            read_metadata,
        )

        hp = self.hparams
        metadata = read_metadata(hp.root)
        if split == "val" and not math.isclose(hp.val_fraction, metadata.val_fraction):
            log.warning("the validation split of %s was held out at conversion (val_fraction=%g); "
                        "data.init_args.val_fraction=%g does not apply to it", hp.root, metadata.val_fraction,
                        hp.val_fraction)
        if not metadata.splits.get(split):
            empty = ImageData(torch.empty(0, *self.image_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                              metadata.class_names)
            return ImageDataset(empty)
        return StreamingImageDataset(
            hp.root, split, image_size=hp.image_size, channels=hp.channels, resize_mode=hp.resize_mode,
            downsample=hp.downsample, downsample_mode=hp.downsample_mode, caption_template=hp.caption_template,
            shuffle=shuffle, seed=hp.seed)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs into memory (once; later calls reuse them).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or None (all).
        """
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._setup_train_val()
        if stage in (None, "test") and self.test_set is None:
            self._setup_test()

    def _setup_train_val(self) -> None:
        hp = self.hparams
        if hp.source == "streaming":
            self.train_set, self.val_set = self._stream("train", shuffle=True), self._stream("val")
        else:
            data = self.load("train", lazy=hp.lazy_decode)
            assert data is not None
            self._class_names = data.class_names
            train, val = _split_off(data, hp.val_fraction, hp.seed)
            self.train_set = ImageDataset(train, hp.caption_template)
            self.val_set = ImageDataset(val, hp.caption_template)
        log.info("%s: %d train / %d val images of shape %s", hp.source, len(self.train_set), len(self.val_set),
                 self.image_shape)

    def _setup_test(self) -> None:
        hp = self.hparams
        if hp.source == "streaming":
            self.test_set = self._stream("test")
            if len(self.test_set):
                return
        data = None if hp.source == "streaming" else self.load("test", lazy=hp.lazy_decode)
        if data is None:
            if self.val_set is None:
                self._setup_train_val()
            fix = "convert a source that has one" if hp.source == "streaming" else "use root/train + root/test"
            log.warning("%s has no test split (%s); testing on the validation split", hp.source, fix)
            self.test_set = self.val_set
            return
        self.test_set = ImageDataset(data, hp.caption_template)
        log.info("%s: %d test images", hp.source, len(data))

    def example_images(self, num_images: int) -> Tensor | None:
        """The first ``num_images`` images of the validation split (else the test split) in [-1, 1], or None when
        neither is loaded: the real inputs of conditions made from data, e.g. a super-resolution stage's low-res."""
        dataset = self.val_set if self.val_set is not None else self.test_set
        if dataset is None or len(dataset) == 0:
            return None
        return torch.stack([dataset[i]["image"] for i in range(min(num_images, len(dataset)))])

    def training_image_batches(self, num_images: int) -> Iterator[Tensor]:
        """This process's share (every world-size-th, from its rank) of the first ``num_images`` training images in
        [-1, 1], in batches of ``batch_size``, unshuffled: all processes together see each image once."""
        dataset = self._require(self.train_set, "fit")
        world_size, rank = self._world()
        indices = range(rank, min(num_images, len(dataset)), world_size)
        for start in range(0, len(indices), self.hparams.batch_size):
            yield torch.stack([dataset[i]["image"] for i in indices[start:start + self.hparams.batch_size]])

    # ------------------------------------------------------------------------------------------- loaders

    def _loader_kwargs(self) -> dict[str, Any]:
        """Common DataLoader options. The loader's own generator supplies the per-iterator base seed, which a
        DataLoader otherwise draws from the global RNG at every new epoch or evaluation, shifting the noise of
        the training steps after it (and so breaking exact resume across epoch boundaries)."""
        workers = self.hparams.num_workers
        generator = torch.Generator().manual_seed(self.hparams.seed + self._world()[1])
        return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available(),
                "generator": generator}

    def _require(self, dataset: Dataset | None, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"ImageDataModule has no data yet: call setup({stage!r}) first (the Trainer does this)")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled, sharded by rank, ``drop_last``; order depends only on (seed, epoch) and resumes exactly."""
        dataset = self._require(self.train_set, "fit")
        if self.hparams.source == "streaming":
            return self._streaming_loader(dataset, shuffle=True)
        world_size, rank = self._world()
        sampler = ResumableSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.hparams.seed, drop_last=True
        )
        if len(sampler) < self.hparams.batch_size:
            raise ValueError(
                f"each of {world_size} process(es) gets {len(sampler)} training images, fewer than "
                f"batch_size={self.hparams.batch_size}, so no full batch exists; lower data.batch_size"
            )
        return ResumableDataLoader(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs()
        )

    def _streaming_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """LitData's loader: each rank streams its shard; its state (the position in the epoch) is checkpointed."""
        from diffusion_pl.data.streaming import streaming_loader

        return streaming_loader(dataset, self.hparams.batch_size, self.hparams.num_workers, shuffle=shuffle,
                                pin_memory=torch.cuda.is_available())

    def _eval_loader(self, dataset: Dataset) -> DataLoader | list:
        """Plain in-order loader; Lightning shards it with a DistributedSampler under DDP (LitData shards a
        streamed split itself)."""
        if len(dataset) == 0:
            return []
        if self.hparams.source == "streaming":
            return self._streaming_loader(dataset, shuffle=False)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        """Validation split held out of train; an empty list (no validation) when ``val_fraction=0``."""
        return self._eval_loader(self._require(self.val_set, "validate"))

    def test_dataloader(self) -> DataLoader | list:
        """Official test split (the validation split for an image folder without one)."""
        return self._eval_loader(self._require(self.test_set, "test"))

    def predict_dataloader(self) -> DataLoader:
        """``predict_num_samples`` items ``{"seed": predict_seed + i}`` in order, for reproducible sampling; with
        ``predict_from`` a split or ``predict_images`` files, their images (``predict_indices``) with seeds and labels."""
        hp = self.hparams
        batch_size = hp.predict_batch_size or hp.batch_size
        if hp.predict_images is not None:
            data = load_predict_images(hp.predict_images, hp.channels)
            indices = hp.predict_indices or range(len(data))
            return DataLoader(PredictImageDataset(data, indices, hp.predict_seed, hp.predict_prompts or ()),
                              batch_size=batch_size)
        if hp.predict_from != "seeds":
            data = self.load(hp.predict_from)
            if data is None:
                raise ValueError(f"{hp.source} has no {hp.predict_from!r} split to predict from: use predict_from=train")
            indices = hp.predict_indices or range(min(hp.predict_num_samples, len(data)))
            return DataLoader(PredictImageDataset(data, indices, hp.predict_seed, hp.predict_prompts or ()),
                              batch_size=batch_size)
        labels = hp.predict_labels if hp.predict_labels else range(self.num_classes)
        if any(not 0 <= label < self.num_classes for label in labels):
            raise ValueError(f"predict_labels must lie in 0..{self.num_classes - 1} ({self.class_names}), got {labels}")
        dataset = SeedDataset(hp.predict_num_samples, hp.predict_seed, labels, hp.predict_prompts or ())
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)

    # ------------------------------------------------------------------------------------------- augmentation

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Random horizontal flip of training batches (never in validation, test or predict)."""
        training = self.trainer is not None and self.trainer.training
        if self.hparams.random_flip and training and isinstance(batch, dict) and "image" in batch:
            batch = {**batch, "image": self.flip(batch["image"])}
        return batch

    def flip(self, images: Tensor) -> Tensor:
        """Flip each image horizontally with probability 1/2.

        The mask is drawn on CPU by this datamodule's generator, reseeded per batch from
        (seed, rank, batch counter): every rank has its own stream, and the counter (the same on every rank,
        saved in :meth:`state_dict`) makes a resumed run flip exactly as an uninterrupted one.

        Args:
            images: (B, C, H, W) batch on any device.

        Returns:
            The batch with a random subset of images mirrored left-right.
        """
        _, rank = self._world()
        self._flip_generator.manual_seed(derived_seed(self.hparams.seed, self._flip_batches, rank))
        self._flip_batches += 1
        mask = torch.rand(images.shape[0], generator=self._flip_generator) < 0.5
        mask = append_dims(mask.to(images.device), images.ndim)
        return torch.where(mask, images.flip(-1), images)

    def state_dict(self) -> dict[str, Any]:
        """Flip state saved in checkpoints: the batch counter and the generator state."""
        return {"flip_batches": self._flip_batches, "flip_generator": self._flip_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the flip state saved by :meth:`state_dict`."""
        self._flip_batches = int(state_dict.get("flip_batches", 0))
        if (state := state_dict.get("flip_generator")) is not None:
            self._flip_generator.set_state(state)


def calibration_batches(datamodule: Any, num_images: int) -> Iterator[Tensor]:
    """The training images a first stage estimates its constants from (e.g. the latent scale): this process's share
    of the first ``num_images``, from an :class:`ImageDataModule`."""
    if not isinstance(datamodule, ImageDataModule):
        raise ConfigError("the first stage estimates its latent scale from the training images of an ImageDataModule; "
                          f"this run's data is {type(datamodule).__name__}: use data: class_path: "
                          "diffusion_pl.data.ImageDataModule, or give the scale: "
                          "model.init_args.first_stage.init_args.scale")
    return datamodule.training_image_batches(num_images)
