"""Derived seeds: every seed the framework computes from another, in one place.

Streams are told apart by seed: two (seed, stream, rank) triples that could meet in one run never share a generator
seed (tests/test_seeds.py checks 10^5 batches x 64 ranks).
"""

from __future__ import annotations

#: Odd 64-bit multipliers (the golden ratio's and splitmix64's) that spread a seed and a rank over 63 bits.
GOLDEN_MULTIPLIER = 0x9E3779B97F4A7C15
RANK_MULTIPLIER = 0xBF58476D1CE4E5B9
#: An odd prime that moves ``predict``'s sampler noise off the stream of the first seed's prior noise.
PREDICT_MULTIPLIER = 7919


def evaluation_seed(batch_idx: int, rank: int) -> int:
    """The seed of an evaluation batch's noise: the process rank in the upper 32 bits, the batch index in the lower,
    so that no two (rank, batch) pairs share a stream (``batch + 1000 * rank`` did once a rank had more than 1,000
    batches) and every evaluation draws the same noise."""
    if not (0 <= batch_idx < 1 << 32 and 0 <= rank < 1 << 31):
        raise ValueError(f"evaluation seeds take batch indices below 2^32 and ranks below 2^31, got {batch_idx}, {rank}")
    return (rank << 32) | batch_idx


def derived_seed(seed: int, stream: int, rank: int = 0) -> int:
    """A seed for stream ``stream`` (a batch counter, a first sample index, a cascade stage) of ``rank`` under the
    user's ``seed``: (seed * golden + rank * splitmix + stream) mod 2^63."""
    return (seed * GOLDEN_MULTIPLIER + rank * RANK_MULTIPLIER + stream) % (1 << 63)


def predict_seed(first_seed: int) -> int:
    """The seed of a ``predict`` batch's sampler noise (stochastic samplers, tasks) from the batch's first seed."""
    return first_seed * PREDICT_MULTIPLIER + 1


def rank_seed(seed: int, rank: int) -> int:
    """The 32-bit seed of ``rank``'s global RNGs (torch, numpy, python) in a run seeded with ``seed``."""
    return (seed + rank * RANK_MULTIPLIER) % (1 << 32)
