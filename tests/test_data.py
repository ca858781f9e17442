"""Data layer: sources, size/channel conversion, exactly resumable order, batched flips."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import fit_bare
from PIL import Image
from torch.utils.data import Dataset

from diffusion_pl.data import (
    DatasetNotFoundError,
    Digits,
    FashionMNIST,
    ImageData,
    ImageDataModule,
    ImageFolder,
    ImageFormat,
    ImageSource,
    ResumableDataLoader,
    ResumableSampler,
    Seeds,
    Torchvision,
)
from diffusion_pl.data import format as image_format
from diffusion_pl.data.format import to_channels
from diffusion_pl.data.sources import fashion_mnist
from diffusion_pl.data.sources.fashion_mnist import read_idx

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="system Fashion-MNIST absent: `apt-get install dataset-fashion-mnist`",
)


# ------------------------------------------------------------------------------------------------ digits


DIGITS_8 = ImageFormat(image_size=8)


def test_digits_metadata_before_setup() -> None:
    dm = ImageDataModule(Digits(), DIGITS_8)
    assert dm.num_classes == 10
    assert dm.class_names == [str(i) for i in range(10)]
    assert dm.train_set is None  # nothing loaded yet


def test_digits_items_and_exact_value_mapping() -> None:
    from sklearn.datasets import load_digits

    dm = ImageDataModule(Digits(), DIGITS_8, batch_size=32, val_fraction=0.1, caption_template="digit {}")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) + len(dm.val_set) == 1500 and len(dm.test_set) == 297
    assert len(dm.val_set) == 150

    # every raw image (0..16) is present once, scaled to 0..255
    raw = np.rint(load_digits().images * 255 / 16).astype(np.uint8).reshape(1797, -1)
    ours = torch.cat([d.data.images for d in (dm.train_set, dm.val_set, dm.test_set)]).reshape(1797, -1).numpy()
    assert sorted(map(bytes, raw)) == sorted(map(bytes, ours))

    item = dm.train_set[0]
    stored = dm.train_set.data.images[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 8, 8)
    assert torch.equal(item["image"], stored.float() / 127.5 - 1)
    assert torch.equal(item["image"][stored == 0], torch.full_like(item["image"][stored == 0], -1.0))
    assert torch.equal(item["image"][stored == 255], torch.ones_like(item["image"][stored == 255]))

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 1, 8, 8)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].dtype == torch.int64
    assert batch["caption"] == [f"digit {int(y)}" for y in batch["label"]]


def test_predict_loader_yields_seeds() -> None:
    dm = ImageDataModule(Digits(), predict=Seeds(num=10, seed=100, batch_size=4))
    batches = list(dm.predict_dataloader())
    assert [len(b["seed"]) for b in batches] == [4, 4, 2]
    assert torch.cat([b["seed"] for b in batches]).tolist() == list(range(100, 110))
    assert batches[0]["seed"].dtype == torch.int64


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_system_copy_sizes_and_padding() -> None:
    dm = ImageDataModule(FashionMNIST(), ImageFormat(image_size=32), val_fraction=0.05)
    assert dm.num_classes == 10 and dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (57000, 3000, 10000)

    raw = torch.from_numpy(read_idx(SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz")[:8].copy())
    labels = read_idx(SYSTEM_FMNIST / "t10k-labels-idx1-ubyte.gz")[:8]
    for i in range(8):
        item = dm.test_set[i]
        image = item["image"][0]
        assert image.shape == (32, 32)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(image[border] == -1)
        assert torch.equal(image[2:30, 2:30], raw[i].float() / 127.5 - 1)
        assert item["label"] == int(labels[i])
        assert item["caption"] == f"a photo of a {dm.class_names[labels[i]]}"


@needs_fmnist
def test_fashion_mnist_explicit_root_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(SYSTEM_FMNIST / name)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    images, labels = fashion_mnist.resolve_fashion_mnist("test", root=str(tmp_path), download=False)
    assert images.parent == raw and labels.parent == raw
    with pytest.raises(DatasetNotFoundError):  # train files are not there, and no fallback is left
        fashion_mnist.resolve_fashion_mnist("train", root=str(tmp_path), download=False)


def test_fashion_mnist_missing_names_both_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    dm = ImageDataModule(FashionMNIST(root=str(tmp_path), download=False))
    for action in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(DatasetNotFoundError) as err:
            action()
        message = str(err.value)
        assert "apt-get install dataset-fashion-mnist" in message
        assert "--data.init_args.source.root=" in message and str(tmp_path) in message


# ------------------------------------------------------------------------------------------------ argument errors


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        ImageDataModule(Digits(), val_fraction=fraction)


def test_bad_image_format() -> None:
    with pytest.raises(ValueError, match="channels"):
        ImageFormat(channels=2)
    with pytest.raises(ValueError, match="resize_mode"):
        ImageFormat(resize_mode="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="downsample"):
        ImageFormat(downsample=0)
    with pytest.raises(ValueError, match="image_size"):
        ImageFormat(image_size=0)


# ------------------------------------------------------------------------------------------------ image folder


def _two_tone(path: Path, size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> None:
    """Save a (width, height) RGB image whose left half is ``left`` and right half is ``right``."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2 :] = right
    Image.fromarray(array).save(path)


def _make_tree(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(3):  # landscape 40x20: shorter side 20 -> 10, center crop keeps the middle 20 columns
        _two_tone(root / "cat" / f"{i}.png", (40, 20), (255, 0, 0), (0, 0, 255))
    for i in range(2):  # portrait 20x30
        _two_tone(root / "dog" / f"{i}.png", (20, 30), (0, 255, 0), (0, 255, 0))


def test_image_folder_resize_center_crop_labels(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    rgb10 = ImageFormat(image_size=10, channels=3)
    dm = ImageDataModule(ImageFolder(str(tmp_path)), rgb10, val_fraction=0.0)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    data = ImageFolder(str(tmp_path)).load("train", rgb10)
    assert data.images.shape == (5, 3, 10, 10) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    cat = data.images[0].int()
    # center crop of a red|blue landscape image: red on the left, blue on the right (not squashed, not left-cropped)
    assert cat[0, :, :4].min() > 200 and cat[2, :, :4].max() < 50
    assert cat[2, :, 6:].min() > 200 and cat[0, :, 6:].max() < 50
    assert torch.all(data.images[3:, 1] == 255)
    assert ImageFolder(str(tmp_path)).load("test", ImageFormat(image_size=10)) is None


def test_image_folder_flat_split_dirs_and_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    _two_tone(flat / "a.png", (12, 12), (10, 10, 10), (10, 10, 10))
    dm = ImageDataModule(ImageFolder(str(flat)), ImageFormat(image_size=8))
    assert dm.class_names == ["flat"]
    split_root = tmp_path / "split"
    _make_tree(split_root / "train")
    _make_tree(split_root / "test")
    test = ImageFolder(str(split_root)).load("test", ImageFormat(image_size=8, channels=1))
    assert test.images.shape == (5, 1, 8, 8) and test.class_names == ("cat", "dog")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageDataModule(ImageFolder(str(empty))).class_names
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageDataModule(ImageFolder(str(tmp_path / "nope"))).class_names


# ------------------------------------------------------------------------------------------------ channels


def test_channel_conversion() -> None:
    gray = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    rgb = to_channels(gray, 3)
    assert rgb.shape == (4, 3, 5, 5) and all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))

    color = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    luma = to_channels(color, 1)
    pil = np.asarray(Image.fromarray(color[0].permute(1, 2, 0).numpy()).convert("L"))
    assert luma.shape == (4, 1, 5, 5)
    assert (luma[0, 0].int() - torch.from_numpy(pil.copy()).int()).abs().max() <= 1

    digits3 = Digits().load("test", ImageFormat(image_size=8, channels=3))
    assert digits3.images.shape == (297, 3, 8, 8)
    assert torch.equal(digits3.images[:, 0], digits3.images[:, 2])


# ------------------------------------------------------------------------------------------------ resumable order


class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _loader(n: int = 50, batch: int = 4, workers: int = 0, replicas: int = 1, rank: int = 0) -> ResumableDataLoader:
    sampler = ResumableSampler(_Indices(n), num_replicas=replicas, rank=rank, seed=3, drop_last=True)
    return ResumableDataLoader(
        _Indices(n), batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0,
    )


def _batches(loader: ResumableDataLoader) -> list[list[int]]:
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_remaining_batches(workers: int) -> None:
    full = _batches(_loader())
    assert len(full) == 12 and sorted(sum(full, [])) != list(range(48))  # shuffled

    loader = _loader(workers=workers)
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(5)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_seen": 5} and seen == full[:5]

    resumed = _loader(workers=workers)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    assert next(iterator).tolist() == full[5]
    assert resumed.state_dict() == {"epoch": 0, "batches_seen": 6}
    assert [b.tolist() for b in iterator] == full[6:]
    assert _batches(resumed) == full  # the skip is one-shot: iterating again starts the epoch over


def test_set_epoch_and_resume_in_later_epoch() -> None:
    loader = _loader()
    epoch0 = _batches(loader)
    loader.set_epoch(1)
    epoch1 = _batches(loader)
    assert epoch0 != epoch1

    resumed = _loader()  # a fresh sampler is at epoch 0: the state restores epoch 1 too
    resumed.load_state_dict({"epoch": 1, "batches_seen": 3})
    assert _batches(resumed) == epoch1[3:]

    finished = _loader()  # a finished epoch resumes at the start of the next one
    finished.load_state_dict({"epoch": 0, "batches_seen": 12})
    assert _batches(finished) == epoch1


def test_replicas_partition_the_data() -> None:
    rank0, rank1 = (sum(_batches(_loader(n=48, replicas=2, rank=r)), []) for r in (0, 1))
    assert len(rank0) == len(rank1) == 24
    assert sorted(rank0 + rank1) == list(range(48))


# ------------------------------------------------------------------------------------------------ random flip


def _flip_dm(seed: int = 0) -> ImageDataModule:
    dm = ImageDataModule(Digits(), DIGITS_8, random_flip=True, seed=seed)
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)  # type: ignore[assignment]
    return dm


def _ramp(batch: int = 64) -> dict[str, torch.Tensor]:
    """Images whose columns increase left to right, so a flip is visible per sample."""
    image = torch.linspace(-1, 1, 8).expand(batch, 1, 8, 8).clone()
    return {"image": image, "label": torch.zeros(batch, dtype=torch.long)}


def _flipped(dm: ImageDataModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = dm.on_after_batch_transfer(batch, 0)["image"]
    return out[:, 0, 0, 0] > 0  # True where the image was mirrored


def test_flip_is_seeded_and_resumes_exactly() -> None:
    a, b, c = _flip_dm(0), _flip_dm(0), _flip_dm(1)
    masks_a = [_flipped(a, _ramp()) for _ in range(3)]
    assert all(torch.equal(m, _flipped(b, _ramp())) for m in masks_a)
    assert not torch.equal(masks_a[0], _flipped(c, _ramp()))
    assert 10 < int(masks_a[0].sum()) < 54  # about half
    assert not torch.equal(masks_a[0], masks_a[1])  # a new mask every batch

    state = a.state_dict()
    after = [_flipped(a, _ramp()) for _ in range(2)]
    restored = _flip_dm(0)
    restored.load_state_dict(state)
    assert all(torch.equal(m, _flipped(restored, _ramp())) for m in after)


def test_flip_only_in_training() -> None:
    dm = _flip_dm()
    dm.trainer.training = False
    batch = _ramp()
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)["image"], batch["image"])
    no_trainer = ImageDataModule(Digits(), DIGITS_8, random_flip=True)
    assert torch.equal(no_trainer.on_after_batch_transfer(batch, 0)["image"], batch["image"])


# ------------------------------------------------------------------------------------------------ with a Trainer


class _Recorder(L.LightningModule):
    """Records what each training batch held (per-sample sums see both the order and the flips)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_seen: list[list[float]] = []
        self.val_images: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image = batch["image"]
        weights = torch.arange(8, dtype=image.dtype)
        self.train_seen.append((image * weights).sum((1, 2, 3)).tolist())
        return self.weight * image.mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_images.append(batch["image"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> ImageDataModule:
    return ImageDataModule(Digits(), DIGITS_8, batch_size=128, random_flip=True, val_fraction=0.05, seed=5)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_trainer_resume_reproduces_order_and_flips(tmp_path: Path) -> None:
    dm = _data()
    full = _Recorder()
    fit_bare(full, dm, tmp_path / "full", every_n_steps=4)  # mid-epoch checkpoints every 4 steps
    per_epoch = 1425 // 128
    assert len(full.train_seen) == 2 * per_epoch
    expected_val = torch.cat([dm.val_set[i]["image"][None] for i in range(len(dm.val_set))])
    assert torch.equal(torch.cat(full.val_images[: len(full.val_images) // 2]), expected_val)  # never flipped

    for step in (4, 16):  # mid-epoch 0 and mid-epoch 1
        ckpt = next((tmp_path / "full").glob(f"*step={step}.ckpt"))
        data, resumed = _data(), _Recorder()
        fit_bare(resumed, data, tmp_path / f"resume{step}", every_n_steps=4, ckpt_path=str(ckpt))
        assert resumed.train_seen == full.train_seen[step:]


def test_colour_images_read_as_grayscale_are_announced_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """channels: 1 on RGB images converts them (luma): one warning per image mode, naming an example file; grayscale
    images convert silently."""
    monkeypatch.setattr(image_format, "_WARNED_COLOR_MODES", set())
    _make_tree(tmp_path)
    with caplog.at_level("WARNING", logger="diffusion_pl.data.format"):
        ImageFolder(str(tmp_path)).load("train", ImageFormat(image_size=10, channels=1))
        to_channels(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 1)
        to_channels(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), 3)
    warnings = [r.getMessage() for r in caplog.records if "to grayscale" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("converting RGB images such as ") and ".png" in warnings[0]


# ------------------------------------------------------------------------------------------------ parts


class Squares(ImageSource):
    """A dataset in one class: gray squares of two brightnesses (the README's example of a new source)."""

    def __init__(self, size: int = 6) -> None:
        self.size = size

    def class_names(self) -> tuple[str, ...]:
        return ("dark", "light")

    def load(self, split: str, image_format: ImageFormat) -> ImageData | None:
        if split == "test":
            return None  # no test split: the data module tests on the validation split
        labels = torch.arange(40) % 2
        images = (64 + 128 * labels).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, self.size, self.size)
        return ImageData(image_format.convert(images), labels, self.class_names())


def test_a_new_source_is_one_class_and_its_spec_is_stored() -> None:
    dm = ImageDataModule(Squares(size=5), ImageFormat(image_size=8, resize_mode="resize"), batch_size=4,
                         val_fraction=0.25)
    dm.setup(None)  # no test split of its own: tested on the validation split
    assert (len(dm.train_set), len(dm.val_set), dm.test_set is dm.val_set) == (30, 10, True)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 8, 8) and set(batch["caption"]) <= {"a photo of a dark", "a photo of a light"}
    assert dm.hparams["source"] == {"class_path": "test_data.Squares", "init_args": {"size": 5}}
    assert dm.hparams["image_format"]["image_size"] == 8 and dm.hparams["predict"]["init_args"]["num"] == 64


def test_the_data_layer_stays_small() -> None:
    """No file of data/ over 300 lines, and the data module's arguments fit on a screen (issue 26)."""
    package = Path(image_format.__file__).parent
    long = {str(path.relative_to(package)): n for path in package.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 300}
    assert not long
    assert len(inspect.signature(ImageDataModule).parameters) <= 12


def test_torchvision_names_a_dataset_class() -> None:
    assert Torchvision("CIFAR10").class_names()[0] == "airplane"
    with pytest.raises(ValueError, match="no dataset 'Imagenet64'"):
        Torchvision("Imagenet64")
