"""Dataset sources: load a split into memory as uint8 (N, C, H, W), converted once to the target size and channels.

Every source returns an :class:`ImageData` whose images already have the requested ``image_size`` and
``channels``, so a dataset's ``__getitem__`` only has to index and rescale (a :class:`LazyImageFolder` converts each
image as it is read, with the same rules). Sources:

- ``fashion_mnist``: explicit ``root`` -> Debian ``dataset-fashion-mnist`` system copy -> torchvision download.
- ``mnist``, ``cifar10``: torchvision, from ``root`` (downloaded there when allowed).
- ``image_folder``: a tree ``root/<class>/<image>`` (or a flat folder = one class; or ``root/train`` and
  ``root/test`` each holding such a tree, which gives an official test split); ``<image>.txt`` beside an image is
  its caption. Decoded up front (:func:`load_image_folder`), or lazily, file by file (:class:`LazyImageFolder`).
- ``digits``: scikit-learn's bundled ``load_digits`` (1797 8x8 images), a tiny real set for fast tests.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from diffusion_pl.core.errors import DataError, UserError
from diffusion_pl.core.resize import DownsampleMode, downsample_uint8

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
ResizeMode = Literal["pad", "resize"]

SOURCE_NAMES: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "image_folder", "digits", "streaming")
#: Sources whose root is required: a folder of images, or a directory written by ``tools/convert_dataset.py``.
ROOTED_SOURCES: tuple[str, ...] = ("image_folder", "streaming")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files (module-level so tests can patch it).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

DIGITS_NUM_TEST = 297
DIGITS_SPLIT_SEED = 0
_CONVERT_CHUNK = 4096
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" conversion


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are absent locally and could not be downloaded; the message says how to fix it."""


@dataclass(frozen=True)
class ImageData:
    """One split held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), already at the target size and channel count.
        labels: int64 tensor (N,).
        class_names: Name of each class; ``labels`` index into it.
        captions: One caption per image (an image folder's caption files), or None: captions from class names.
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, index: int) -> Tensor:
        """The uint8 (C, H, W) image ``index``."""
        return self.images[index]

    def caption(self, index: int) -> str | None:
        """The caption of image ``index``, or None when the split has no caption of its own."""
        return None if self.captions is None else self.captions[index]

    def subset(self, index: Tensor) -> ImageData:
        """The images at ``index`` (int64 positions), in that order."""
        captions = None if self.captions is None else tuple(self.captions[i] for i in index.tolist())
        return ImageData(self.images[index], self.labels[index], self.class_names, captions)

    def downsampled(self, factor: int, mode: DownsampleMode) -> ImageData:
        """Every image reduced by ``factor`` (:func:`~diffusion_pl.core.resize.downsample_uint8`)."""
        return replace(self, images=downsample_uint8(self.images, factor, mode))


def holdout_indices(num_images: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (kept, held-out) positions of a seeded random ``fraction`` of ``num_images``: the validation split,
    the same for the same seed in memory, read lazily or converted for streaming."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    num_held = int(round(fraction * num_images))
    return order[num_held:].sort().values, order[:num_held].sort().values


# --------------------------------------------------------------------------------------------------- conversion


#: PIL modes of single-channel images (no colour is lost converting them to "L").
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


_WARNED_COLOR_MODES: set[str] = set()


def warn_color_to_gray(mode: str, example: str = "") -> None:
    """Log, once per process and image mode, that colour images are converted to grayscale (channels: 1)."""
    if mode in _WARNED_COLOR_MODES:
        return
    _WARNED_COLOR_MODES.add(mode)
    log.warning("converting %s images%s to grayscale (ITU-R 601-2 luma), as data.init_args.channels=1 asks; set "
                "channels: 3 to keep their colour", mode, f" such as {example}" if example else "")


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Convert uint8 (N, C, H, W) images between grayscale and RGB.

    Grayscale -> RGB repeats the channel; RGB -> grayscale uses ITU-R 601-2 luminance (as PIL's ``"L"``).

    Args:
        images: uint8 tensor (N, C, H, W) with C in {1, 3}.
        channels: Target channel count, 1 or 3.

    Returns:
        uint8 tensor (N, channels, H, W).
    """
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        warn_color_to_gray("RGB")
        weights = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        gray = (images.float() * weights).sum(1, keepdim=True)
        return gray.round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert images with {have} channels to {channels}; supported channel counts are 1 and 3")


def fit_size(images: Tensor, image_size: int, resize_mode: ResizeMode = "pad") -> Tensor:
    """Bring uint8 (N, C, H, W) images to (N, C, image_size, image_size).

    Images no larger than ``image_size`` in ``"pad"`` mode are padded symmetrically with black (e.g.
    Fashion-MNIST 28 -> 32 gets a 2-pixel border); otherwise the shorter side is resized (antialiased
    bilinear) to ``image_size`` and the center is cropped.

    Args:
        images: uint8 tensor (N, C, H, W).
        image_size: Target side length.
        resize_mode: ``"pad"`` or ``"resize"``.

    Returns:
        uint8 tensor (N, C, image_size, image_size).
    """
    height, width = images.shape[-2:]
    if (height, width) == (image_size, image_size):
        return images
    if resize_mode == "pad" and height <= image_size and width <= image_size:
        top, left = (image_size - height) // 2, (image_size - width) // 2
        padding = (left, image_size - width - left, top, image_size - height - top)
        return F.pad(images, padding, value=0)
    images = TF.resize(images, [image_size], antialias=True)
    return TF.center_crop(images, [image_size, image_size]).contiguous()


def convert_images(images: Tensor, image_size: int, channels: int, resize_mode: ResizeMode = "pad") -> Tensor:
    """Apply :func:`to_channels` and :func:`fit_size` in chunks (bounded memory), cheapest order first.

    Args:
        images: uint8 tensor (N, C, H, W).
        image_size: Target side length.
        channels: Target channel count, 1 or 3.
        resize_mode: ``"pad"`` or ``"resize"``.

    Returns:
        uint8 tensor (N, channels, image_size, image_size).
    """

    def convert(chunk: Tensor) -> Tensor:
        if chunk.shape[1] > channels:
            return fit_size(to_channels(chunk, channels), image_size, resize_mode)
        return to_channels(fit_size(chunk, image_size, resize_mode), channels)

    if images.shape[0] <= _CONVERT_CHUNK:
        return convert(images).contiguous()
    return torch.cat([convert(chunk) for chunk in images.split(_CONVERT_CHUNK)])


# --------------------------------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    """Download folder when no ``root`` is given: ``$DIFFUSION_PL_DATA`` or ``~/.cache/diffusion_pl/datasets``."""
    if env := os.environ.get("DIFFUSION_PL_DATA"):
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "diffusion_pl" / "datasets"


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format, optionally gzipped) holding unsigned bytes.

    Args:
        path: ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        uint8 array with the shape stored in the header.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number); re-download or delete it")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {array.size} bytes; re-download it")
    return array.reshape(dims)


def _from_arrays(
    images: np.ndarray | Tensor, labels: np.ndarray | Tensor, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """Turn (N, H, W) or (N, H, W, C) / (N, C, H, W) uint8 arrays into (N, C, H, W) uint8 + int64 labels."""
    images = torch.as_tensor(np.asarray(images, dtype=np.uint8))
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif channels_last:
        images = images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


# --------------------------------------------------------------------------------------------------- fashion-mnist


def _idx_pair(folder: Path, split: Split) -> tuple[Path, Path] | None:
    """Return the (images, labels) idx files of ``split`` in ``folder`` (gzipped or not), or None."""
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
        match = next((p for p in candidates if p.is_file()), None)
        if match is None:
            return None
        found.append(match)
    return found[0], found[1]


def _fashion_mnist_folders(root: Path) -> list[Path]:
    """Layouts accepted under an explicit root: the files directly, or torchvision's ``FashionMNIST/raw``."""
    return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]


def _fashion_mnist_missing(root: str | None, download: bool, reason: str = "") -> DatasetNotFoundError:
    where = f"in root={root!r} (or its FashionMNIST/raw) " if root else ""
    tried = "download was disabled (download=False)" if not download else f"the download failed{reason}"
    return DatasetNotFoundError(
        f"Fashion-MNIST not found {where}nor in the system copy {FASHION_MNIST_SYSTEM_DIR}, and {tried}. "
        "Fix: install the Debian package (`apt-get install dataset-fashion-mnist`), "
        "or pass `data.root=` a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, "
        "or allow the torchvision download (`data.download=true`, needs internet)."
    )


def resolve_fashion_mnist(split: Split, root: str | None = None, download: bool = True) -> tuple[Path, Path]:
    """Find (downloading if needed and allowed) the Fashion-MNIST idx files of ``split``.

    Order: explicit ``root`` -> Debian system copy -> torchvision download into ``root`` (or the cache dir).

    Args:
        split: ``"train"`` or ``"test"``.
        root: Optional folder holding the idx files (or torchvision's layout).
        download: Whether to try a torchvision download when no local copy exists.

    Returns:
        Paths to the images and labels idx files.
    """
    folders = _fashion_mnist_folders(Path(root)) if root else []
    for folder in [*folders, FASHION_MNIST_SYSTEM_DIR]:
        if (pair := _idx_pair(folder, split)) is not None:
            if root and folder not in folders:
                log.warning("Fashion-MNIST not found under the given root=%r (nor its FashionMNIST/raw); using the "
                            "system copy in %s instead", root, folder)
            log.debug("Fashion-MNIST %s split from %s", split, folder)
            return pair
    if root and download:
        log.warning("Fashion-MNIST not found under the given root=%r (nor its FashionMNIST/raw, nor the system copy "
                    "%s); downloading it into %s", root, FASHION_MNIST_SYSTEM_DIR, root)
    if not download:
        raise _fashion_mnist_missing(root, download)
    target = Path(root) if root else default_cache_dir()
    log.info("Fashion-MNIST not found locally; downloading with torchvision into %s", target)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=split == "train", download=True)
    except Exception as err:  # noqa: BLE001 - any network/IO failure gets the same actionable message
        raise _fashion_mnist_missing(root, download, f" ({type(err).__name__}: {err})") from err
    pair = _idx_pair(target / "FashionMNIST" / "raw", split)
    if pair is None:
        raise _fashion_mnist_missing(root, download, " (files absent after download)")
    return pair


def _load_fashion_mnist(split: Split, root: str | None, download: bool) -> tuple[Tensor, Tensor]:
    images_path, labels_path = resolve_fashion_mnist(split, root, download)
    return _from_arrays(read_idx(images_path), read_idx(labels_path))


# --------------------------------------------------------------------------------------------------- torchvision


def _load_torchvision(name: str, split: Split, root: str | None, download: bool) -> tuple[Tensor, Tensor]:
    """Load MNIST or CIFAR-10 through torchvision from ``root`` (or the cache dir)."""
    from torchvision import datasets

    cls, layout = {"mnist": (datasets.MNIST, "MNIST/raw"), "cifar10": (datasets.CIFAR10, "cifar-10-batches-py")}[name]
    target = root or str(default_cache_dir())
    try:
        dataset = cls(target, train=split == "train", download=download)
    except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError offline, URLError on network errors
        how = "download was disabled (download=False)" if not download else f"the download failed ({err})"
        raise DatasetNotFoundError(
            f"{name} not found under {target!r} and {how}. Fix: pass `data.root=` a folder where torchvision's "
            f"files already are (it looks in <root>/{layout}), "
            "or allow the download (`data.download=true`) on a machine with internet."
        ) from err
    return _from_arrays(dataset.data, dataset.targets, channels_last=name == "cifar10")


# --------------------------------------------------------------------------------------------------- digits


def _load_digits(split: Split, root: str | None, download: bool) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits; values 0..16 scaled to 0..255; fixed seeded 1500/297 train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("source 'digits' needs scikit-learn: `pip install scikit-learn`") from err
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    keep = order[-DIGITS_NUM_TEST:] if split == "test" else order[:-DIGITS_NUM_TEST]
    return _from_arrays(images[keep], bunch.target[keep])


# --------------------------------------------------------------------------------------------------- image folder


def _has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    """Sorted subfolders that contain at least one image (anywhere below them)."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [d for d in subdirs if any(_is_image(p) for p in d.rglob("*"))]


def _image_folder_root(root: str | None) -> Path:
    if root is None:
        raise ValueError(
            "source 'image_folder' needs a folder: pass `data.root=/path/to/images` (one subfolder per class)"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"image_folder root {str(path)!r} does not exist or is not a folder; pass `data.root=` an existing folder "
            "of images (one subfolder per class, or a flat folder of images for a single class)"
        )
    return path


def _image_folder_classes(folder: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names and the image files of each class under ``folder`` (subfolders, else a flat folder)."""
    dirs = _class_dirs(folder)
    if dirs:
        return [d.name for d in dirs], [sorted(p for p in d.rglob("*") if _is_image(p)) for d in dirs]
    files = sorted(p for p in folder.iterdir() if _is_image(p))
    if not files:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(folder)!r}; put images in one subfolder per "
            "class (or directly in the folder for a single class), or point `data.root=` at the right folder"
        )
    return [folder.name or "images"], [files]


def image_folder_class_names(root: str | None) -> tuple[str, ...]:
    """Class names of an image folder without decoding any image (subfolder names, sorted)."""
    path = _image_folder_root(root)
    folder = path / "train" if _has_split_dirs(path) else path
    return tuple(_image_folder_classes(folder)[0])


def decode_image(file: Path | BinaryIO, channels: int, image_size: int, resize_mode: ResizeMode,
                 name: str | None = None) -> Tensor:
    """Decode one image (a path or an open binary file) to uint8 (C, image_size, image_size) by :func:`fit_size`; one
    that does not decode raises a DataError naming it (``name``, else the path)."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            if channels == 1 and img.mode not in GRAY_MODES:
                warn_color_to_gray(img.mode, str(name or file))
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # PIL: truncated, unidentified or malformed files
        raise DataError(f"cannot decode image {name or file} ({type(error).__name__}: {error}): the file is damaged "
                        "or not an image; replace it, or move it out of the data folder") from error
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return fit_size(tensor.unsqueeze(0), image_size, resize_mode)[0]


def read_caption(image_path: Path) -> str | None:
    """The caption of an image file: the text of ``<image>.txt`` beside it (stripped), or None without one."""
    path = image_path.with_suffix(".txt")
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


@dataclass(frozen=True)
class LazyImageFolder:
    """An image folder's split as a list of files, each decoded when it is read (in the DataLoader's workers).

    The same images as :func:`load_image_folder` (same decode, :func:`fit_size` and downsampling), without the
    up-front decode or a copy of the split in every process; the in-memory split is faster for small sets.

    Attributes:
        files: The image files, in label order.
        labels: int64 tensor (N,).
        class_names: Name of each class; ``labels`` index into it.
        captions: One caption per image, or None (no caption files).
        image_size: Side every image is fitted to before downsampling.
        channels: 1 or 3.
        resize_mode: ``"pad"`` or ``"resize"`` (:func:`fit_size`).
        downsample: Factor each fitted image is reduced by.
        downsample_mode: ``"area"`` or ``"bilinear"``.
    """

    files: tuple[Path, ...]
    labels: Tensor
    class_names: tuple[str, ...]
    captions: tuple[str, ...] | None
    image_size: int
    channels: int
    resize_mode: ResizeMode
    downsample: int = 1
    downsample_mode: DownsampleMode = "area"

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> Tensor:
        """Decode image ``index`` to uint8 (C, H, W) at the split's format."""
        image = decode_image(self.files[index], self.channels, self.image_size, self.resize_mode)
        return downsample_uint8(image[None], self.downsample, self.downsample_mode)[0]

    def caption(self, index: int) -> str | None:
        """The caption of image ``index``, or None when the split has no caption files."""
        return None if self.captions is None else self.captions[index]

    def subset(self, index: Tensor) -> LazyImageFolder:
        """The images at ``index`` (int64 positions), in that order."""
        positions = index.tolist()
        captions = None if self.captions is None else tuple(self.captions[i] for i in positions)
        return replace(self, files=tuple(self.files[i] for i in positions), labels=self.labels[index],
                       captions=captions)

    def downsampled(self, factor: int, mode: DownsampleMode) -> LazyImageFolder:
        """The split with every image reduced by ``factor`` after it is decoded."""
        return replace(self, downsample=self.downsample * factor, downsample_mode=mode)


def _folder_files(split: Split, root: str | None) -> tuple[list[Path], list[int], tuple[str, ...]] | None:
    """The image files of ``split``, their labels and the class names (None: the folder has no test split)."""
    path = _image_folder_root(root)
    if _has_split_dirs(path):
        names = image_folder_class_names(root)
        folder = path / split
    elif split == "test":
        return None
    else:
        names, folder = None, path
    found_names, files = _image_folder_classes(folder)
    names = tuple(names or found_names)
    index = {name: i for i, name in enumerate(names)}
    paths, labels = [], []
    for name, class_files in zip(found_names, files):
        if name not in index:
            raise ValueError(f"class folder {name!r} in {str(folder)!r} has no counterpart in {str(path / 'train')!r}")
        paths += class_files
        labels += [index[name]] * len(class_files)
    return paths, labels, names


def _folder_captions(files: list[Path]) -> tuple[str, ...] | None:
    """Each file's caption (empty where it has none), or None when no file has a caption."""
    captions = [read_caption(path) for path in files]
    return None if all(c is None for c in captions) else tuple(c or "" for c in captions)


def load_image_folder(
    split: Split, root: str | None, image_size: int, channels: int, resize_mode: ResizeMode, lazy: bool = False,
) -> ImageData | LazyImageFolder | None:
    """Decode an image folder, converting each image as it is read (bounded memory), or list it for lazy decoding.

    Args:
        split: ``"train"`` or ``"test"``; ``"test"`` exists only with the ``root/train`` + ``root/test`` layout.
        root: The folder.
        image_size: Target side length.
        channels: Target channel count.
        resize_mode: ``"pad"`` or ``"resize"``.
        lazy: Only list the files (:class:`LazyImageFolder`); each image is decoded when it is read.

    Returns:
        The split, or None when the folder has no test split.
    """
    found = _folder_files(split, root)
    if found is None:
        return None
    files, labels, names = found
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    captions = _folder_captions(files)
    if lazy:
        return LazyImageFolder(tuple(files), label_tensor, names, captions, image_size, channels, resize_mode)
    images = torch.empty((len(files), channels, image_size, image_size), dtype=torch.uint8)  # no second copy
    for index, path in enumerate(files):
        images[index] = decode_image(path, channels, image_size, resize_mode)
    return ImageData(images, label_tensor, names, captions)


# --------------------------------------------------------------------------------------------------- registry

_ArrayLoader = Callable[[Split, str | None, bool], tuple[Tensor, Tensor]]

_ARRAY_SOURCES: dict[str, tuple[_ArrayLoader, tuple[str, ...]]] = {
    "fashion_mnist": (_load_fashion_mnist, FASHION_MNIST_CLASSES),
    "mnist": (lambda split, root, download: _load_torchvision("mnist", split, root, download), DIGIT_CLASSES),
    "cifar10": (lambda split, root, download: _load_torchvision("cifar10", split, root, download), CIFAR10_CLASSES),
    "digits": (_load_digits, DIGIT_CLASSES),
}


def check_source(source: str) -> None:
    """Raise a ValueError listing the valid names if ``source`` is unknown."""
    if source not in SOURCE_NAMES:
        raise ValueError(f"unknown data source {source!r}; valid sources are: {', '.join(SOURCE_NAMES)}")


def _required_root(source: str, root: str | None) -> str:
    if root is None:
        raise ValueError(f"source {source!r} needs data.root: a folder of images (image_folder), or a directory "
                         "written by tools/convert_dataset.py or its s3:// / gs:// URL (streaming)")
    return root


def source_class_names(source: str, root: str | None = None) -> tuple[str, ...]:
    """Class names of a source without loading its images (image_folder lists its subfolders).

    Args:
        source: One of :data:`SOURCE_NAMES`.
        root: The folder, for ``image_folder``.

    Returns:
        Class names in label order.
    """
    check_source(source)
    if source == "image_folder":
        return image_folder_class_names(root)
    if source == "streaming":
        from diffusion_pl.data.streaming import (
            read_metadata,  # imports litdata, only when used
        )

        return read_metadata(_required_root(source, root)).class_names
    return _ARRAY_SOURCES[source][1]


def load_split(
    source: str,
    split: Split,
    *,
    root: str | None = None,
    image_size: int = 32,
    channels: int = 1,
    resize_mode: ResizeMode = "pad",
    download: bool = True,
    lazy: bool = False,
) -> ImageData | LazyImageFolder | None:
    """Load one split of a source into memory at the requested size and channel count.

    Args:
        source: One of :data:`SOURCE_NAMES`.
        split: ``"train"`` or ``"test"`` (the official test split where the dataset has one).
        root: Local folder of the data (required for ``image_folder`` and ``streaming``).
        image_size: Target side length.
        channels: Target channel count, 1 or 3.
        resize_mode: ``"pad"`` (pad smaller images with black) or ``"resize"`` (resize + center-crop).
        download: Whether a torchvision download may be attempted.
        lazy: An image folder's files are listed, not decoded (:class:`LazyImageFolder`).

    Returns:
        The split, or None when the source has no such split (an image folder without ``train``/``test``).
    """
    check_source(source)
    check_image_args(image_size, channels, resize_mode)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    if lazy and source != "image_folder":
        raise ValueError(f"lazy decoding applies to source 'image_folder' only, not {source!r}: set "
                         "data.init_args.lazy_decode=false (source 'streaming' streams a converted dataset instead)")
    if source == "image_folder":
        return load_image_folder(split, root, image_size, channels, resize_mode, lazy)
    if source == "streaming":
        from diffusion_pl.data.streaming import (
            load_streaming_split,  # imports litdata, only when used
        )

        return load_streaming_split(_required_root(source, root), split, image_size, channels, resize_mode)
    loader, names = _ARRAY_SOURCES[source]
    images, labels = loader(split, root, download)
    return ImageData(convert_images(images, image_size, channels, resize_mode), labels, names)


def prepare_source(source: str, root: str | None = None, download: bool = True) -> None:
    """Download what a source needs (call once, on one process); a no-op for local sources.

    Args:
        source: One of :data:`SOURCE_NAMES`.
        root: Local folder of the data.
        download: Whether a download may be attempted.
    """
    check_source(source)
    if source == "fashion_mnist":
        for split in ("train", "test"):
            resolve_fashion_mnist(split, root, download)
    elif source in ("mnist", "cifar10"):
        for split in ("train", "test"):
            _load_torchvision(source, split, root, download)


def check_image_args(image_size: int, channels: int, resize_mode: str) -> None:
    """Validate the target format, raising a ValueError that says which values are allowed."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if resize_mode not in ("pad", "resize"):
        raise ValueError(f"resize_mode must be 'pad' or 'resize', got {resize_mode!r}")
