"""Fashion-MNIST: an explicit root, then the Debian ``dataset-fashion-mnist`` system copy, then a torchvision
download."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import ImageData
from diffusion_pl.data.sources.arrays import default_cache_dir, image_data
from diffusion_pl.data.sources.base import DatasetNotFoundError, ImageSource, Split, with_absolute_path

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files (module-level so tests can patch it).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class FashionMNIST(ImageSource):
    """Zalando's Fashion-MNIST: 60,000 train and 10,000 test 28x28 grayscale images of 10 classes of clothes.

    Args:
        root: A folder holding the idx files (or torchvision's ``FashionMNIST/raw`` under it); None: the system copy,
            else the download folder.
        download: Allow a torchvision download when no local copy exists.
    """

    def __init__(self, root: str | None = None, download: bool = True) -> None:
        self.root, self.download = root, download

    def class_names(self) -> tuple[str, ...]:
        return FASHION_MNIST_CLASSES

    def load(self, split: Split, image_format: ImageFormat) -> ImageData:
        images, labels = resolve_fashion_mnist(split, self.root, self.download)
        return image_data(read_idx(images), read_idx(labels), FASHION_MNIST_CLASSES, image_format)

    def prepare(self) -> None:
        for split in ("train", "test"):
            resolve_fashion_mnist(split, self.root, self.download)

    def identity(self) -> dict:
        return with_absolute_path(super().identity(), "root")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format, optionally gzipped) holding unsigned bytes: a uint8 array of the shape
    stored in its header."""
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
        "or pass `--data.init_args.source.root=` a folder holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, "
        "or allow the torchvision download (`--data.init_args.source.download=true`, needs internet)."
    )


def resolve_fashion_mnist(split: Split, root: str | None = None, download: bool = True) -> tuple[Path, Path]:
    """Find (downloading if needed and allowed) the (images, labels) idx files of ``split``.

    Order: explicit ``root`` -> Debian system copy -> torchvision download into ``root`` (or the cache dir).
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
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

        TorchvisionFashionMNIST(str(target), train=split == "train", download=True)
    except Exception as err:  # noqa: BLE001 - any network/IO failure gets the same actionable message
        raise _fashion_mnist_missing(root, download, f" ({type(err).__name__}: {err})") from err
    pair = _idx_pair(target / "FashionMNIST" / "raw", split)
    if pair is None:
        raise _fashion_mnist_missing(root, download, " (files absent after download)")
    return pair
