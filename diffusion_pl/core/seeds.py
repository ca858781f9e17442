"""Derived seeds: every seed the framework computes from another, in one place."""

from __future__ import annotations


def evaluation_seed(batch_idx: int, rank: int) -> int:
    """The seed of an evaluation batch's noise: the process rank in the upper 32 bits, the batch index in the lower,
    so that no two (rank, batch) pairs share a stream (``batch + 1000 * rank`` did once a rank had more than 1,000
    batches) and every evaluation draws the same noise."""
    if not (0 <= batch_idx < 1 << 32 and 0 <= rank < 1 << 31):
        raise ValueError(f"evaluation seeds take batch indices below 2^32 and ranks below 2^31, got {batch_idx}, {rank}")
    return (rank << 32) | batch_idx
