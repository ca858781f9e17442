"""Exactly resumable data order: a seeded distributed sampler that can skip, and a DataLoader that counts.

Lightning stores ``state_dict()`` of every train DataLoader that has ``state_dict``/``load_state_dict`` in the
checkpoint and calls ``load_state_dict`` before it iterates again on resume. The permutation of an epoch
depends only on (seed, epoch), as in :class:`~torch.utils.data.DistributedSampler`, so skipping the batches
already seen reproduces the rest of the interrupted epoch exactly.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """A :class:`DistributedSampler` with a one-shot ``skip`` of the first indices of the next iteration.

    Works without a process group when ``num_replicas`` and ``rank`` are given (e.g. 1 and 0). Lightning
    calls ``set_epoch`` every epoch and keeps a ``DistributedSampler`` it finds under DDP.

    Args:
        dataset: The dataset to sample from.
        num_replicas: Number of processes (the trainer's world size).
        rank: This process's global rank.
        shuffle: Whether to shuffle with a permutation seeded by ``seed + epoch``.
        seed: Base seed, identical on every rank.
        drop_last: Drop the tail so that every replica gets the same number of indices.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def skip(self, num_indices: int) -> None:
        """Drop the first ``num_indices`` indices of the next iteration only (mid-epoch resume).

        Args:
            num_indices: How many of this replica's indices to skip; ``len(self)`` skips the whole epoch.
        """
        if num_indices < 0:
            raise ValueError(f"cannot skip a negative number of indices ({num_indices})")
        self._skip = num_indices

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the current epoch is saved and restored by Lightning.

    It counts the batches its iterator has yielded (so it is exact with ``num_workers > 0``, whatever the
    workers prefetch). ``load_state_dict`` makes the next ``__iter__`` continue the saved epoch: with a
    :class:`ResumableSampler` it skips the seen indices without loading them; with any other sampler (e.g.
    one Lightning substituted for ``overfit_batches``) it loads and discards the seen batches. The
    constructor takes the standard DataLoader arguments, so Lightning can re-instantiate it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_seen = 0
        self._resume_pending = False
        self._resume_epoch = 0

    def _resumable_sampler(self) -> tuple[ResumableSampler | None, int]:
        """The ResumableSampler to skip in, and the number of indices per batch (None if skipping is impossible)."""
        if self.batch_sampler is None:  # automatic batching disabled: one index per item
            return (self.sampler, 1) if isinstance(self.sampler, ResumableSampler) else (None, 1)
        if type(self.batch_sampler) is BatchSampler and isinstance(self.batch_sampler.sampler, ResumableSampler):
            return self.batch_sampler.sampler, self.batch_sampler.batch_size
        return None, 1

    def _epoch_sampler(self) -> Any:
        """The object holding ``epoch``/``set_epoch``: the sampler, or the batch sampler's sampler."""
        if hasattr(self.sampler, "set_epoch"):
            return self.sampler
        return getattr(self.batch_sampler, "sampler", None)

    def __iter__(self) -> Iterator[Any]:
        # Lightning sets the epoch before iterating; when it has moved past the saved epoch (a checkpoint written
        # after training stopped counts its epoch as finished), the new epoch starts from its beginning.
        same_epoch = getattr(self._epoch_sampler(), "epoch", 0) == self._resume_epoch
        skip = self._batches_seen if self._resume_pending and same_epoch else 0
        self._resume_pending = False
        self._batches_seen = skip
        sampler, per_batch = self._resumable_sampler()
        if skip and sampler is not None:
            sampler.skip(skip * per_batch)
        iterator = super().__iter__()
        if skip and sampler is None:
            log.info("ResumableDataLoader: sampler cannot skip; loading and discarding %d seen batches", skip)
            iterator = itertools.islice(iterator, skip, None)
        return self._count(iterator)

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches_seen += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the underlying sampler (its permutation depends on it)."""
        if (sampler := self._epoch_sampler()) is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Position in the data order: ``{"epoch": sampler epoch, "batches_seen": batches yielded this epoch}``."""
        return {"epoch": int(getattr(self._epoch_sampler(), "epoch", 0)), "batches_seen": self._batches_seen}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next ``__iter__`` continues from it.

        A finished epoch (``batches_seen >= len(self)``) resumes at the start of the next one.

        Args:
            state_dict: ``{"epoch": int, "batches_seen": int}``.
        """
        missing = {"epoch", "batches_seen"} - set(state_dict)
        if missing:
            raise KeyError(
                f"ResumableDataLoader state is missing {sorted(missing)}; expected keys 'epoch' and 'batches_seen'"
            )
        epoch, seen = int(state_dict["epoch"]), int(state_dict["batches_seen"])
        if seen >= len(self):
            epoch, seen = epoch + 1, 0
        self.set_epoch(epoch)
        self._batches_seen = seen
        self._resume_epoch = epoch
        self._resume_pending = True
