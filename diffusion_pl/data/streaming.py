"""Streaming datasets through LitData: a source converted once into optimized chunks, streamed by every rank.

A converted dataset is a directory (local, or an object-store URL such as ``s3://bucket/imagenet64``) holding one
LitData dataset per split (``train/``, ``val/``, ``test/``, written by :func:`litdata.optimize`) and
``diffusion_pl.json`` (:class:`StreamingMetadata`). Each item stores the image (PNG or JPEG bytes, or uint8 C x H x W),
its label and its caption. LitData's loader gives every rank and node its own shard and saves the position in the
epoch in the checkpoint (``StreamingDataLoader.state_dict``), so training resumes with the next unseen batch.

Beside each split's ``index.json`` (LitData's list of chunk files), ``chunk_sha256.json`` records the SHA-256 of every
chunk file. Each process checks a chunk file the first time it reads from it (a local file before it is read, a
remote one once downloaded): a missing, truncated or changed chunk is a :class:`~diffusion_pl.core.errors.DataError` naming
the file and the item, never a changed image trained on. A dataset converted before checksums keeps working
unchecked (a warning says so).

    python tools/convert_dataset.py --source image_folder --root photos/ --output photos_optimized/ --image-size 64
"""

from __future__ import annotations

import bisect
import functools
import io
import json
import logging
import multiprocessing
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize
from litdata.exceptions import ChunkWaitTimeoutError
from litdata.streaming.sampler import ChunkedIndex
from PIL import Image
from torch import Tensor

from diffusion_pl.core.checkpoint_file import write_atomically
from diffusion_pl.core.errors import DataError, UserError
from diffusion_pl.core.files import file_sha256
from diffusion_pl.core.resize import DownsampleMode, downsample_uint8
from diffusion_pl.core.tensors import from_uint8
from diffusion_pl.data.sources import (
    ImageData,
    LazyImageFolder,
    ResizeMode,
    decode_image,
    fit_size,
    holdout_indices,
    load_split,
    to_channels,
)

log = logging.getLogger(__name__)

#: The file that marks a directory as a dataset converted by this framework.
METADATA_FILE = "diffusion_pl.json"
#: LitData's list of a split's chunk files.
INDEX_FILE = "index.json"
#: Beside it: the SHA-256 of each chunk file, recorded at conversion.
CHECKSUM_FILE = "chunk_sha256.json"
StorageFormat = Literal["png", "jpeg", "raw"]
STORAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "raw")


class NotOptimizedError(UserError, FileNotFoundError):
    """A ``streaming`` root that is not a dataset written by ``tools/convert_dataset.py``."""


class ConversionError(UserError, ValueError):
    """A conversion that cannot run as asked (its output exists, an unknown storage format, ...)."""


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
        seed: The seed of that hold-out (:func:`~diffusion_pl.data.sources.holdout_indices`).
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


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _is_remote(root: str) -> bool:
    return "://" in root


def _not_optimized(root: str, reason: str) -> NotOptimizedError:
    return NotOptimizedError(
        f"data.root={root!r} is not a dataset converted for source 'streaming' ({reason}). Convert the data first, "
        "`python tools/convert_dataset.py --source image_folder --root IMAGES --output NEW_DIR --image-size N` (or "
        "--source fashion_mnist / cifar10), and pass data.root=NEW_DIR; or set data.init_args.source to the source "
        "the folder holds (e.g. image_folder)"
    )


def read_text(root: str, name: str) -> str:
    """The text of file ``name`` in ``root`` (a local path, or a URL fetched through LitData).

    Raises:
        FileNotFoundError: It is not there (for a URL: it could not be fetched; the message says why).
    """
    if not _is_remote(root):
        return (Path(root).expanduser() / name).read_text()
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as cache:
        local = str(Path(cache) / name)
        try:
            get_downloader(root, cache, []).download_file(_join(root, name), local)
            return Path(local).read_text()
        except Exception as error:  # noqa: BLE001 - each object store raises its own not-found error
            raise FileNotFoundError(f"cannot fetch {name}: {error}") from error


def read_metadata(root: str) -> StreamingMetadata:
    """The :class:`StreamingMetadata` of a converted dataset (a local path, or a URL fetched through LitData)."""
    try:
        text = read_text(root, METADATA_FILE)
    except OSError as error:
        reason = (str(error) if _is_remote(root) else
                  f"no {METADATA_FILE} in it" if Path(root).expanduser().is_dir() else "no such directory")
        raise _not_optimized(root, reason) from error
    try:
        fields = json.loads(text)
        fields["class_names"] = tuple(fields["class_names"])
        return StreamingMetadata(**fields)
    except (ValueError, TypeError, KeyError) as error:
        raise _not_optimized(root, f"{METADATA_FILE} is damaged: {error}") from error


# --------------------------------------------------------------------------------------------------- writing


def encode_item(data: ImageData | LazyImageFolder, storage: StorageFormat, quality: int, index: int) -> dict[str, Any]:
    """Item ``index`` of ``data`` as LitData stores it: ``{"image": PNG/JPEG bytes or uint8 C x H x W, "label": int,
    "caption": str}`` (an empty caption: made from the class name when read)."""
    image = data.image(index)
    if storage == "raw":
        stored: bytes | np.ndarray = image.numpy()
    else:
        array = image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        pil.save(buffer, format="PNG" if storage == "png" else "JPEG", quality=quality)
        stored = buffer.getvalue()
    return {"image": stored, "label": int(data.labels[index]), "caption": data.caption(index) or ""}


def convert_source(
    source: str,
    output: str,
    *,
    root: str | None = None,
    image_size: int = 32,
    channels: int = 3,
    resize_mode: ResizeMode = "pad",
    storage: StorageFormat = "png",
    quality: int = 95,
    val_fraction: float = 0.05,
    seed: int = 0,
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
    download: bool = True,
) -> StreamingMetadata:
    """Convert every split of ``source`` into LitData chunks under ``output`` (``train``, ``val``, ``test``).

    ``val`` holds the same images an :class:`~diffusion_pl.data.ImageDataModule` holds out with ``val_fraction`` and
    ``seed``. An image folder is decoded file by file in the workers, never whole.

    Args:
        source: A source of :data:`~diffusion_pl.data.sources.SOURCE_NAMES` (not ``streaming``).
        output: A new local directory (upload it to an object store to stream it from there).
        root: The source's folder (required for ``image_folder``).
        image_size: Side the images are converted to (:func:`~diffusion_pl.data.sources.fit_size`).
        channels: 1 or 3.
        resize_mode: ``"pad"`` or ``"resize"``.
        storage: ``"png"`` (lossless), ``"jpeg"`` (``quality``) or ``"raw"`` uint8.
        quality: JPEG quality.
        val_fraction: Fraction of the train split written as ``val``.
        seed: Seed of that hold-out.
        num_workers: LitData worker processes.
        chunk_bytes: Size of each chunk file.
        download: Whether a torchvision download may be attempted.

    Returns:
        The metadata written to ``output/diffusion_pl.json``.
    """
    if source == "streaming":
        raise ConversionError("the source is already a converted (streaming) dataset; convert the original source")
    if storage not in STORAGE_FORMATS:
        raise ConversionError(f"storage must be one of {', '.join(STORAGE_FORMATS)}, got {storage!r}")
    target = Path(output).expanduser()
    if target.exists() and any(target.iterdir()):
        raise ConversionError(f"the output {output} is not empty: choose a new directory or delete it")
    lazy = source == "image_folder"

    def split_data(split: str) -> ImageData | LazyImageFolder | None:
        return load_split(source, split, root=root, image_size=image_size, channels=channels, resize_mode=resize_mode,
                          download=download, lazy=lazy)

    train = split_data("train")
    assert train is not None
    keep, held = holdout_indices(len(train), val_fraction, seed)
    splits = {"train": train.subset(keep), "val": train.subset(held), "test": split_data("test")}
    counts = {}
    for name, data in splits.items():
        if data is None or len(data) == 0:
            continue
        log.info("writing %d %s images of %s to %s", len(data), name, source, target / name)
        # LitData sets the start method process-wide (default spawn): keep the process's own
        optimize(fn=partial(encode_item, data, storage, quality), inputs=list(range(len(data))),
                 output_dir=str(target / name), num_workers=num_workers, chunk_bytes=chunk_bytes, verbose=False,
                 start_method=multiprocessing.get_start_method())
        write_checksums(target / name)
        counts[name] = len(data)
    metadata = StreamingMetadata(tuple(train.class_names), storage, image_size, channels, counts, val_fraction, seed,
                                 source)
    (target / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2))
    return metadata


def write_checksums(split: Path) -> None:
    """Record the SHA-256 of each chunk file of a converted split (as its ``index.json`` lists them) in
    :data:`CHECKSUM_FILE` beside it, written atomically."""
    chunks = json.loads((split / INDEX_FILE).read_text())["chunks"]
    digests = {chunk["filename"]: file_sha256(split / chunk["filename"]) for chunk in chunks}
    write_atomically(split / CHECKSUM_FILE, [json.dumps({"sha256": digests}, indent=2).encode()],
                     what="chunk checksums")


# ---------------------------------------------------------------------------------------------------- chunks


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
    (without it, no checksums: :func:`_warn_unchecked` says so once per dataset)."""
    chunks = json.loads(read_text(_join(root, split), INDEX_FILE))["chunks"]
    try:
        digests = json.loads(read_text(_join(root, split), CHECKSUM_FILE))["sha256"]
    except FileNotFoundError:
        digests = {}
        _warn_unchecked(root)
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{_join(_join(root, split), CHECKSUM_FILE)} is damaged ({error}): convert the dataset again "
                        "with tools/convert_dataset.py") from error
    firsts = np.cumsum([0] + [chunk["chunk_size"] for chunk in chunks[:-1]]).tolist()
    return [ChunkFile(chunk["filename"], first, chunk["chunk_bytes"], digests.get(chunk["filename"]))
            for chunk, first in zip(chunks, firsts)]


@functools.cache
def _warn_unchecked(root: str) -> None:
    log.warning("the streaming dataset %s has no %s (it was converted before checksums were recorded): its chunk "
                "files are not checked, and a damaged one goes unnoticed; convert it again with "
                "tools/convert_dataset.py to record them", root, CHECKSUM_FILE)


# --------------------------------------------------------------------------------------------------- reading


class StreamingImageDataset(StreamingDataset):
    """One split of a converted dataset, streamed as ``{"image": float in [-1, 1], "label": int, "caption": str}``.

    Images are decoded and brought to the requested format (the same :func:`fit_size`, channel conversion and
    downsampling as the in-memory sources) in the loader workers. LitData shards the items over ranks, nodes and
    workers: build it after the process group exists (``setup`` does).

    Args:
        root: The converted dataset (local path or URL).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side every image is fitted to before downsampling.
        channels: 1 or 3.
        resize_mode: ``"pad"`` or ``"resize"``.
        downsample: Factor each fitted image is reduced by.
        downsample_mode: ``"area"`` or ``"bilinear"``.
        caption_template: Caption of an item without one of its own, from its class name.
        shuffle: Shuffle chunks and items (training); the order depends on ``seed`` and the epoch.
        seed: Seed of the shuffle.

    Each chunk file is checked the first time this process reads from it (module docstring): a missing, truncated or
    changed one is a :class:`~diffusion_pl.core.errors.DataError` naming it and the item read.
    """

    def __init__(self, root: str, split: str, *, image_size: int, channels: int, resize_mode: ResizeMode = "pad",
                 downsample: int = 1, downsample_mode: DownsampleMode = "area",
                 caption_template: str = "a photo of a {}", shuffle: bool = False, seed: int = 0) -> None:
        self.metadata = read_metadata(root)
        if not self.metadata.splits.get(split):
            raise _not_optimized(root, f"it has no {split!r} split; it has {sorted(self.metadata.splits)}")
        super().__init__(_join(root, split), shuffle=shuffle, seed=seed, drop_last=shuffle or None)
        self.chunk_files = read_chunk_files(root, split)
        self._chunk_firsts = [chunk.first for chunk in self.chunk_files]
        self._checked_chunks: set[int] = set()
        self._remote = _is_remote(root)
        self.image_size, self.channels, self.resize_mode = image_size, channels, resize_mode
        self.downsample, self.downsample_mode = downsample, downsample_mode
        self.class_captions = [caption_template.format(name) for name in self.metadata.class_names]

    def decode(self, stored: np.ndarray | bytes | memoryview) -> Tensor:
        """A stored image (uint8 C x H x W, or PNG/JPEG bytes) as uint8 (C, H, W) at this dataset's format."""
        size = self.image_size * self.downsample
        if isinstance(stored, np.ndarray):
            image = fit_size(to_channels(torch.from_numpy(stored.copy())[None], self.channels), size,
                             self.resize_mode)[0]
        else:
            image = decode_image(io.BytesIO(stored), self.channels, size, self.resize_mode,
                                 name=f"in {self.input_dir.path or self.input_dir.url}")
        return downsample_uint8(image[None], self.downsample, self.downsample_mode)[0]

    def read(self, index: Any) -> tuple[Tensor, int, str | None]:
        """Item ``index`` as (uint8 image at this dataset's format, label, its own caption or None)."""
        item = self._stored_item(index)
        return self.decode(item["image"]), int(item["label"]), item["caption"] or None

    def _stored_item(self, index: int | ChunkedIndex) -> dict[str, Any]:
        """LitData's item ``index`` (a split index, or LitData's ``ChunkedIndex``), from a checked chunk file."""
        chunk, item = (index.chunk_index, index.index) if isinstance(index, ChunkedIndex) else (
            bisect.bisect_right(self._chunk_firsts, index) - 1, index)
        if not self._remote:
            self.check_chunk(chunk, item)  # a local file, before LitData reads it
        try:
            stored = super().__getitem__(index)
        except ChunkWaitTimeoutError as error:  # LitData reports a chunk that never came whole as a hung download
            raise self._chunk_error(chunk, item, f"did not arrive whole in {error.waited_s:.0f} s: it is missing or "
                                                 "truncated in the store, or the download failed") from error
        self.check_chunk(chunk, item)  # a remote chunk once downloaded (checked already: nothing to do)
        return stored

    def check_chunk(self, chunk: int, item: int) -> None:
        """Check chunk file ``chunk`` (read for ``item``) once per process: that it is there, has the size LitData
        wrote and, where conversion recorded one, the same SHA-256. A remote dataset's copy is checked once it is
        downloaded whole (until then, or when LitData evicted it already, at a later read).

        Raises:
            DataError: The chunk file is missing, truncated or changed; the message names it and the item.
        """
        if chunk in self._checked_chunks:
            return
        recorded = self.chunk_files[chunk]
        path = Path(self.input_dir.path or "") / recorded.name
        size = path.stat().st_size if path.is_file() else None
        if self._remote and (size is None or size < recorded.size):
            return
        if size is None:
            raise self._chunk_error(chunk, item, "is missing")
        if size < recorded.size:
            raise self._chunk_error(chunk, item, f"is truncated: {size} of its {recorded.size} bytes are there")
        if size > recorded.size:
            raise self._chunk_error(chunk, item, f"is changed: {size} bytes, not the {recorded.size} written")
        if recorded.sha256 is not None and file_sha256(path) != recorded.sha256:
            raise self._chunk_error(chunk, item, "is damaged: its SHA-256 differs from the one recorded at "
                                                 "conversion")
        self._checked_chunks.add(chunk)

    def _chunk_error(self, chunk: int, item: int, problem: str) -> DataError:
        path = _join(self.input_dir.url or self.input_dir.path or "", self.chunk_files[chunk].name)
        return DataError(f"streaming chunk file {path} {problem} (item {item} is in it): copy the dataset again from "
                         "where it was converted, or convert it again with tools/convert_dataset.py")

    def __getitem__(self, index: Any) -> dict[str, Any]:
        image, label, caption = self.read(index)
        return {"image": from_uint8(image), "label": label, "caption": caption or self.class_captions[label]}


class ResumedOnceLoader(StreamingDataLoader):
    """LitData's loader whose restored position applies to the first epoch after ``load_state_dict`` only.

    LitData keeps replaying a restored state until an iterator runs to its end, but Lightning ends an epoch after
    ``len(loader)`` batches without exhausting the iterator, so a resumed run would repeat the rest of the resumed
    epoch instead of starting the next one.
    """

    _resume_pending = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resume_pending = self.restore

    def __iter__(self) -> Any:
        self.restore, self._resume_pending = self._resume_pending, False
        return super().__iter__()


def streaming_loader(dataset: StreamingImageDataset, batch_size: int, num_workers: int, *, shuffle: bool,
                     pin_memory: bool = False) -> StreamingDataLoader:
    """LitData's loader over ``dataset``: its ``state_dict`` (saved in checkpoints by Lightning) holds the position
    in the epoch; training (``shuffle``) drops the last partial batch so that every rank takes the same steps."""
    loader = ResumedOnceLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
                               drop_last=shuffle, pin_memory=pin_memory)
    if shuffle and len(loader) == 0:
        raise ValueError(f"the training split's {dataset.metadata.splits['train']} images give no full batch of "
                         f"batch_size={batch_size} on each process (and loader worker); lower data.batch_size or "
                         "data.num_workers")
    return loader


def load_streaming_split(root: str, split: str, image_size: int, channels: int,
                         resize_mode: ResizeMode = "pad") -> ImageData | None:
    """A whole split of a converted dataset in memory (FID reference statistics, predict inputs); None without it."""
    metadata = read_metadata(root)
    if not metadata.splits.get(split):
        return None
    dataset = StreamingImageDataset(root, split, image_size=image_size, channels=channels, resize_mode=resize_mode)
    count = metadata.splits[split]  # the whole split on every rank (a rank's len(dataset) is its shard)
    images = torch.empty((count, channels, image_size, image_size), dtype=torch.uint8)  # no second copy
    labels, captions = [], []
    for index in range(count):
        images[index], label, caption = dataset.read(index)
        labels.append(label)
        captions.append(caption)
    own = None if all(c is None for c in captions) else tuple(c or "" for c in captions)
    return ImageData(images, torch.tensor(labels, dtype=torch.int64), metadata.class_names, own)
