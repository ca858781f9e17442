"""ImageDataModule: one LightningDataModule for every model family (diffusion, classifiers, CLIP, autoencoders)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.core.errors import ConfigError
from diffusion_pl.core.seeds import derived_seed
from diffusion_pl.core.spec import describe, spec_of
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import Images
from diffusion_pl.data.loading import Batching
from diffusion_pl.data.predict import PredictInput, Seeds
from diffusion_pl.data.sources import FashionMNIST, ImageSource, Split

log = logging.getLogger(__name__)


class ImageDataModule(L.LightningDataModule):
    """Image data for every model: batches ``{"image": (B, C, H, W) in [-1, 1], "label": long, "caption": list[str]}``.

    Where the images come from is the ``source`` part, what ``predict`` runs on the ``predict`` part; this module holds
    what every source shares: the image format, batching, loader workers, the validation hold-out, and horizontal
    flips, a batched augmentation applied after the batch reaches the device, driven by seeds that this module's
    ``state_dict`` restores. The training order is exactly resumable and sharded by rank (the source's loader).

    Args:
        source: The dataset, e.g. ``FashionMNIST()`` (default), ``Torchvision("CIFAR10")``, ``ImageFolder("photos/")``,
            ``Streaming("s3://bucket/photos_optimized")``.
        image_format: Size, channels, fit and downsampling of every image (the CLI links size and channels into the
            model and its network).
        random_flip: Flip training images horizontally with probability 1/2.
        val_fraction: Fraction of the train split held out (seeded, fixed) for validation, in [0, 1).
        batch_size: Batch size per process for train/val/test (and predict, unless its part gives one).
        num_workers: DataLoader worker processes (persistent when > 0).
        seed: Seed of the validation split, the training order and the flips.
        caption_template: Caption made from the class name, e.g. ``"a photo of a {}"``.
        predict: What ``predict`` runs on: ``Seeds(num, seed, labels, prompts)`` (default ``Seeds()``),
            ``SplitImages(split, num, indices)`` or ``ImageFiles(path)``.
    """

    def __init__(
        self,
        source: ImageSource | None = None,
        image_format: ImageFormat = ImageFormat(),
        random_flip: bool = False,
        val_fraction: float = 0.05,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        caption_template: str = "a photo of a {}",
        predict: PredictInput | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1) (the fraction of the train split held out), got {val_fraction}"
            )
        if batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}")
        self.source = source if source is not None else FashionMNIST()
        self.image_format = image_format
        self.predict = predict if predict is not None else Seeds()
        self.save_hyperparameters(ignore=["source", "image_format", "predict"], logger=False)
        self.hparams.update(source=spec_of(self.source), image_format=asdict(image_format), predict=spec_of(self.predict))
        self._class_names: tuple[str, ...] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._flip_batches = 0
        self._flip_generator = torch.Generator()

    # ------------------------------------------------------------------------------------------- metadata

    @property
    def class_names(self) -> list[str]:
        """Class names in label order, known without loading images (an image folder lists its subfolders)."""
        if self._class_names is None:
            self._class_names = self.source.class_names()
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes; link it to the model's ``num_classes``."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, image_size, image_size) of every image."""
        return self.image_format.shape

    def _source_name(self) -> str:
        """The source as logs name it, e.g. ``ImageFolder(root='photos/')``."""
        return describe(self.hparams.source)

    def _batching(self) -> Batching:
        """How this process batches: the world size and rank of the attached trainer ((1, 0) without one)."""
        world_size, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
        hp = self.hparams
        return Batching(hp.batch_size, hp.num_workers, hp.seed, world_size, rank)

    # ------------------------------------------------------------------------------------------- loading

    def prepare_data(self) -> None:
        """Download the data when needed and allowed (runs on one process)."""
        self.source.prepare()

    def load(self, split: Split) -> Images | None:
        """The whole ``split`` in this module's image format (None when the source has no such split)."""
        return self.source.load(split, self.image_format)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs (once; later calls reuse them).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or None (all).
        """
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._setup_train_val()
        if stage in (None, "test") and self.test_set is None:
            self._setup_test()

    def _setup_train_val(self) -> None:
        hp = self.hparams
        self.train_set, self.val_set = self.source.fit_datasets(self.image_format, hp.val_fraction, hp.seed,
                                                                hp.caption_template)
        log.info("%s: %d train / %d val images of shape %s", self._source_name(), len(self.train_set),
                 len(self.val_set), self.image_shape)

    def _setup_test(self) -> None:
        self.test_set = self.source.test_dataset(self.image_format, self.hparams.caption_template)
        if self.test_set is not None and len(self.test_set):
            log.info("%s: %d test images", self._source_name(), len(self.test_set))
            return
        if self.val_set is None:
            self._setup_train_val()
        log.warning("%s has no test split; testing on the validation split", self._source_name())
        self.test_set = self.val_set

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
        batching = self._batching()
        indices = range(batching.rank, min(num_images, len(dataset)), batching.world_size)
        for start in range(0, len(indices), batching.batch_size):
            yield torch.stack([dataset[i]["image"] for i in indices[start:start + batching.batch_size]])

    # ------------------------------------------------------------------------------------------- loaders

    def _require(self, dataset: Dataset | None, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"ImageDataModule has no data yet: call setup({stage!r}) first (the Trainer does this)")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled, sharded by rank, full batches only; the order depends only on (seed, epoch) and resumes
        exactly."""
        return self.source.loader(self._require(self.train_set, "fit"), self._batching(), train=True)

    def _eval_loader(self, dataset: Dataset) -> DataLoader | list:
        """In-order loader (Lightning shards it under DDP; a streamed split shards itself); an empty list for an empty
        split."""
        return [] if len(dataset) == 0 else self.source.loader(dataset, self._batching(), train=False)

    def val_dataloader(self) -> DataLoader | list:
        """Validation split held out of train; an empty list (no validation) when ``val_fraction=0``."""
        return self._eval_loader(self._require(self.val_set, "validate"))

    def test_dataloader(self) -> DataLoader | list:
        """Official test split (the validation split for a source without one)."""
        return self._eval_loader(self._require(self.test_set, "test"))

    def predict_dataloader(self) -> DataLoader:
        """The items of the ``predict`` part, in order, for reproducible prediction."""
        return self.predict.loader(self, self.hparams.batch_size)

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
        self._flip_generator.manual_seed(derived_seed(self.hparams.seed, self._flip_batches, self._batching().rank))
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


class TrainingImages(Protocol):
    """A data module that serves its training images for calibration (:class:`ImageDataModule` does)."""

    def training_image_batches(self, num_images: int) -> Iterator[Tensor]:
        """This process's share of the first ``num_images`` training images in [-1, 1], in batches."""


def calibration_batches(datamodule: Any, num_images: int) -> Iterator[Tensor]:
    """The training images a first stage estimates its constants from (e.g. the latent scale): this process's share
    of the first ``num_images``, from any data module with ``training_image_batches`` (:class:`TrainingImages`)."""
    batches = getattr(datamodule, "training_image_batches", None)
    if not callable(batches):
        raise ConfigError("the first stage estimates its latent scale from the training images of the data module, "
                          f"and this run's data ({type(datamodule).__name__}) has no training_image_batches(num_images)"
                          ": use data: class_path: diffusion_pl.data.ImageDataModule, or give the scale: "
                          "model.init_args.first_stage.init_args.scale")
    return batches(num_images)
