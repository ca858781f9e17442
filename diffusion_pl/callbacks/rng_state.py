"""Exact resume of every random stream: global torch/numpy/python RNG states travel in the checkpoint."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from diffusion_pl.core.seeds import rank_seed


def seed_rank_streams(rank: int) -> None:
    """Reseed the global torch (CPU and CUDA), numpy and python RNGs of rank ``rank`` > 0 from its torch seed.

    ``seed_everything`` gives every DDP rank the same seed, so without this every rank would draw the same
    diffusion timesteps, noise and dropout masks (only the images differ), wasting the larger batch. Rank 0
    keeps its streams, so it draws what a single-process run draws.
    """
    if rank == 0:
        return
    seed = rank_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect_rng_states() -> dict[str, Any]:
    """Global RNG states of torch (CPU and CUDA), numpy and python, as tensors and plain types only,
    so checkpoints stay loadable with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`collect_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeRNGState(pl.Callback):
    """Save every rank's global RNG states with each checkpoint; restore them right before the first resumed batch.

    The states are restored at the first ``on_train_batch_start`` after loading, not at load time,
    because Lightning draws from the global RNG in between (e.g. the DataLoader's base seed). Together
    with the resumable data order this makes noise draws, timesteps and dropout after ``--ckpt_path``
    identical to an uninterrupted run. Under DDP every rank is reseeded at ``setup`` so that ranks draw
    independent noise, and the states of all ranks are gathered (checkpoint saving runs on every rank),
    so they keep drawing independent noise after resume.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give every DDP rank its own random streams for training (see :func:`seed_rank_streams`)."""
        if stage == "fit" and trainer.world_size > 1:
            seed_rank_streams(trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states()
        _, world = _rank_and_world()
        if world == 1:
            return {"per_rank": [states]}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, states)
        return {"per_rank": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = _rank_and_world()
        per_rank = state_dict.get("per_rank", [])
        self._pending = per_rank[rank] if len(per_rank) == world else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
