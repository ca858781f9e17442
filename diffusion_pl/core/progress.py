"""Optional progress bar over a sampler's steps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def maybe_progress(items: Iterable[T], enabled: bool, total: int | None = None, desc: str = "sampling") -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar when ``enabled``; otherwise iterate them unchanged."""
    return iter(tqdm(items, total=total, desc=desc, leave=False)) if enabled else iter(items)
