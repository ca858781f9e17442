"""What a converted dataset records: ``diffusion_pl.json`` (:class:`StreamingMetadata`) and, beside each split's
``index.json`` (LitData's list of chunk files), ``chunk_sha256.json`` with the SHA-256 of every chunk file."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from diffusion_pl.core.checkpoint_file import write_atomically
from diffusion_pl.core.errors import DataError, UserError
from diffusion_pl.core.files import file_sha256

log = logging.getLogger(__name__)

#: The file that marks a directory as a dataset converted by this framework.
METADATA_FILE = "diffusion_pl.json"
#: LitData's list of a split's chunk files.
INDEX_FILE = "index.json"
#: Beside it: the SHA-256 of each chunk file, recorded at conversion.
CHECKSUM_FILE = "chunk_sha256.json"
StorageFormat = Literal["png", "jpeg", "raw"]


class NotOptimizedError(UserError, FileNotFoundError):
    """A streamed root that is not a dataset written by ``tools/convert_dataset.py``."""


@dataclass(frozen=True)
class StreamingMetadata:
    """What ``diffusion_pl.json`` records about a converted dataset.

    Attributes:
        class_names: Name of each class; labels index into it.
        storage: How images are stored: ``"png"``, ``"jpeg"`` (encoded bytes) or ``"raw"`` (uint8 C x H x W).
        image_size: The side the images were converted to.
        channels: Their channel count.
        splits: Number of images of each split written (``train``, ``val``, ``test``).
        val_fraction: The fraction of the source's train split held out as ``val``.
        seed: The seed of that hold-out (:func:`~diffusion_pl.data.images.holdout_indices`).
        source: The source it was converted from.
    """

    class_names: tuple[str, ...]
    storage: StorageFormat
    image_size: int
    channels: int
    splits: dict[str, int] = field(default_factory=dict)
    val_fraction: float = 0.0
    seed: int = 0
    source: str = ""


def join(root: str, name: str) -> str:
    """``name`` inside ``root`` (a local path or a URL)."""
    return f"{root.rstrip('/')}/{name}"


def is_remote(root: str) -> bool:
    return "://" in root


def not_optimized(root: str, reason: str) -> NotOptimizedError:
    return NotOptimizedError(
        f"{root!r} is not a dataset converted for streaming ({reason}). Convert the data first, "
        "`python tools/convert_dataset.py --source diffusion_pl.data.ImageFolder --source.root IMAGES --output NEW_DIR "
        "--image_format.image_size N` (or --source diffusion_pl.data.FashionMNIST, ...), and stream NEW_DIR; or "
        "name the source the folder holds (e.g. data.init_args.source: {class_path: diffusion_pl.data.ImageFolder, "
        "init_args: {root: DIR}})"
    )


def read_text(root: str, name: str) -> str:
    """The text of file ``name`` in ``root`` (a local path, or a URL fetched through LitData).

    Raises:
        FileNotFoundError: It is not there (for a URL: it could not be fetched; the message says why).
    """
    if not is_remote(root):
        return (Path(root).expanduser() / name).read_text()
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as cache:
        local = str(Path(cache) / name)
        try:
            get_downloader(root, cache, []).download_file(join(root, name), local)
            return Path(local).read_text()
        except Exception as error:  # noqa: BLE001 - each object store raises its own not-found error
            raise FileNotFoundError(f"cannot fetch {name}: {error}") from error


def read_metadata(root: str) -> StreamingMetadata:
    """The :class:`StreamingMetadata` of a converted dataset (a local path, or a URL fetched through LitData)."""
    try:
        text = read_text(root, METADATA_FILE)
    except OSError as error:
        reason = (str(error) if is_remote(root) else
                  f"no {METADATA_FILE} in it" if Path(root).expanduser().is_dir() else "no such directory")
        raise not_optimized(root, reason) from error
    try:
        fields = json.loads(text)
        fields["class_names"] = tuple(fields["class_names"])
        return StreamingMetadata(**fields)
    except (ValueError, TypeError, KeyError) as error:
        raise not_optimized(root, f"{METADATA_FILE} is damaged: {error}") from error


def write_checksums(split: Path) -> None:
    """Record the SHA-256 of each chunk file of a converted split (as its ``index.json`` lists them) in
    :data:`CHECKSUM_FILE` beside it, written atomically."""
    chunks = json.loads((split / INDEX_FILE).read_text())["chunks"]
    digests = {chunk["filename"]: file_sha256(split / chunk["filename"]) for chunk in chunks}
    write_atomically(split / CHECKSUM_FILE, [json.dumps({"sha256": digests}, indent=2).encode()],
                     what="chunk checksums")


@dataclass(frozen=True)
class ChunkFile:
    """One chunk file of a split.

    Attributes:
        name: Its file name.
        first: The index of its first item in the split.
        size: Its bytes (LitData's ``chunk_bytes``).
        sha256: Its SHA-256 recorded at conversion; None for a dataset converted before checksums.
    """

    name: str
    first: int
    size: int
    sha256: str | None


def read_chunk_files(root: str, split: str) -> list[ChunkFile]:
    """The chunk files of a split of a converted dataset, from LitData's ``index.json`` and :data:`CHECKSUM_FILE`
    (without it, no checksums: :func:`warn_unchecked` says so once per dataset)."""
    chunks = json.loads(read_text(join(root, split), INDEX_FILE))["chunks"]
    try:
        digests = json.loads(read_text(join(root, split), CHECKSUM_FILE))["sha256"]
    except FileNotFoundError:
        digests = {}
        warn_unchecked(root)
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{join(join(root, split), CHECKSUM_FILE)} is damaged ({error}): convert the dataset again "
                        "with tools/convert_dataset.py") from error
    firsts = np.cumsum([0] + [chunk["chunk_size"] for chunk in chunks[:-1]]).tolist()
    return [ChunkFile(chunk["filename"], first, chunk["chunk_bytes"], digests.get(chunk["filename"]))
            for chunk, first in zip(chunks, firsts)]


@functools.cache
def warn_unchecked(root: str) -> None:
    log.warning("the streaming dataset %s has no %s (it was converted before checksums were recorded): its chunk "
                "files are not checked, and a damaged one goes unnoticed; convert it again with "
                "tools/convert_dataset.py to record them", root, CHECKSUM_FILE)
