"""Reading a converted dataset: one split streamed by every rank (its own shard, its position in the epoch saved in
checkpoints), or read whole into memory.

Each process checks a chunk file the first time it reads from it (a local file before it is read, a remote one once
downloaded): a missing, truncated or changed chunk is a :class:`~diffusion_pl.core.errors.DataError` naming the file
and the item, never a changed image trained on. A dataset converted before checksums keeps working unchecked (a
warning says so).
"""

from __future__ import annotations

import bisect
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.exceptions import ChunkWaitTimeoutError
from litdata.streaming.sampler import ChunkedIndex
from torch import Tensor

from diffusion_pl.core.errors import DataError
from diffusion_pl.core.files import file_sha256
from diffusion_pl.core.tensors import from_uint8
from diffusion_pl.data.format import ImageFormat
from diffusion_pl.data.images import ImageData
from diffusion_pl.data.streaming.metadata import is_remote, join, not_optimized, read_chunk_files, read_metadata


class StreamingImageDataset(StreamingDataset):
    """One split of a converted dataset, streamed as ``{"image": float in [-1, 1], "label": int, "caption": str}``.

    Images are decoded and brought to the format (the same fit, channel conversion and downsampling as the in-memory
    sources) in the loader workers. LitData shards the items over ranks, nodes and workers: build it after the
    process group exists (``setup`` does).

    Args:
        root: The converted dataset (local path or URL).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_format: The format of the images served.
        caption_template: Caption of an item without one of its own, from its class name.
        shuffle: Shuffle chunks and items (training); the order depends on ``seed`` and the epoch.
        seed: Seed of the shuffle.

    Each chunk file is checked the first time this process reads from it (module docstring): a missing, truncated or
    changed one is a :class:`~diffusion_pl.core.errors.DataError` naming it and the item read.
    """

    def __init__(self, root: str, split: str, image_format: ImageFormat, *, caption_template: str = "a photo of a {}",
                 shuffle: bool = False, seed: int = 0) -> None:
        self.metadata = read_metadata(root)
        if not self.metadata.splits.get(split):
            raise not_optimized(root, f"it has no {split!r} split; it has {sorted(self.metadata.splits)}")
        super().__init__(join(root, split), shuffle=shuffle, seed=seed, drop_last=shuffle or None)
        self.chunk_files = read_chunk_files(root, split)
        self._chunk_firsts = [chunk.first for chunk in self.chunk_files]
        self._checked_chunks: set[int] = set()
        self._remote = is_remote(root)
        self.image_format = image_format
        self.class_captions = [caption_template.format(name) for name in self.metadata.class_names]

    def decode(self, stored: np.ndarray | bytes | memoryview) -> Tensor:
        """A stored image (uint8 C x H x W, or PNG/JPEG bytes) as uint8 (C, H, W) in this dataset's format."""
        if isinstance(stored, np.ndarray):
            return self.image_format.convert(torch.from_numpy(stored.copy())[None])[0]
        return self.image_format.decode(io.BytesIO(stored), name=f"in {self.input_dir.path or self.input_dir.url}")

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
        path = join(self.input_dir.url or self.input_dir.path or "", self.chunk_files[chunk].name)
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


def load_streaming_split(root: str, split: str, image_format: ImageFormat) -> ImageData | None:
    """A whole split of a converted dataset in memory (FID reference statistics, predict inputs); None without it."""
    metadata = read_metadata(root)
    if not metadata.splits.get(split):
        return None
    dataset = StreamingImageDataset(root, split, image_format)
    count = metadata.splits[split]  # the whole split on every rank (a rank's len(dataset) is its shard)
    images = torch.empty((count, *image_format.shape), dtype=torch.uint8)  # no second copy
    labels, captions = [], []
    for index in range(count):
        images[index], label, caption = dataset.read(index)
        labels.append(label)
        captions.append(caption)
    own = None if all(c is None for c in captions) else tuple(c or "" for c in captions)
    return ImageData(images, torch.tensor(labels, dtype=torch.int64), metadata.class_names, own)
