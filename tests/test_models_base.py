"""The shared module base: derived seeds never collide, and every module clips fused optimizers' gradients."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import REPO, tiny_cli

from diffusion_pl.core.seeds import derived_seed, evaluation_seed, predict_seed, rank_seed
from diffusion_pl.models import AutoencoderModule, ClassifierModule, CLIPModule, DiffusionModule
from diffusion_pl.models.base import PartsModule

BATCHES, RANKS = 100_000, 64


def test_evaluation_seeds_are_distinct_for_every_batch_and_rank() -> None:
    """10^5 evaluation batches on each of 64 ranks get 6.4 million distinct seeds (``batch + 1000 * rank`` gave
    batch 1000 of rank 0 the stream of batch 0 of rank 1)."""
    seeds = {evaluation_seed(batch, rank) for rank in range(RANKS) for batch in range(BATCHES)}
    assert len(seeds) == BATCHES * RANKS
    assert evaluation_seed(1000, 0) != evaluation_seed(0, 1)


def test_derived_seeds_are_distinct_across_streams_and_ranks() -> None:
    """The flip streams of 64 ranks over 10^5 batches, and the per-sample-batch streams of a seed, never share a seed;
    neither do two user seeds' first streams."""
    seeds = {derived_seed(7, stream, rank) for rank in range(RANKS) for stream in range(BATCHES)}
    assert len(seeds) == BATCHES * RANKS
    assert len({derived_seed(seed, 0) for seed in range(BATCHES)}) == BATCHES
    assert all(0 <= seed < 1 << 63 for seed in (derived_seed(2**62, 2**40, 63), derived_seed(0, 0)))


def test_rank_and_predict_seeds() -> None:
    """Rank seeds fit numpy's 32 bits and differ per rank; rank 0 keeps the run's seed; predict's sampler seed is not
    the first image's prior-noise seed."""
    ranks = [rank_seed(1234, rank) for rank in range(RANKS)]
    assert ranks[0] == 1234 and len(set(ranks)) == RANKS and all(0 <= seed < 1 << 32 for seed in ranks)
    assert [predict_seed(seed) for seed in (0, 1, 5)] == [1, 7920, 39596]


def test_every_module_is_a_parts_module() -> None:
    for module in (DiffusionModule, ClassifierModule, CLIPModule, AutoencoderModule):
        assert issubclass(module, PartsModule) and module.RUN_METRICS


class GradNorms(pl.Callback):
    """The norm of each optimizer's gradients at the end of every batch (after clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        for optimizer in trainer.optimizers:
            grads = [p.grad.norm() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))


FUSED = ["--trainer.precision=bf16-mixed", "--model.init_args.optimizer.init_args.fused=true", "--trainer.max_steps=2",
         "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.callbacks=[]",
         "--trainer.enable_checkpointing=false"]
CASES = {
    "classifier": ("configs/classifier/fashion_mnist.yaml", ["--trainer.gradient_clip_val=0.001"]),
    "clip": ("configs/clip/fashion_mnist.yaml", ["--trainer.gradient_clip_val=0.001"]),
    "autoencoder": ("configs/ldm/autoencoder_fashion_mnist.yaml", ["--trainer.gradient_clip_val=0.001"]),
    "autoencoder with discriminator (manual optimisation)": (
        "configs/ldm/image_folder_autoencoder_f8.yaml",
        ["--model.init_args.gradient_clip_val=0.001", "--model.init_args.disc_start=0"]),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_optimizer_clips_under_bf16(case: str, tmp_path: Path) -> None:
    """Lightning's mixed-precision plugin refuses to clip for fused optimizers even without a grad scaler; every
    module's base clips them itself (bf16 has no scaler), through the trainer's clipping and manual optimisation."""
    config, clip = CASES[case]
    cli = tiny_cli(tmp_path, *FUSED, *clip, config=str(REPO / config))
    norms = GradNorms()
    cli.trainer.callbacks.append(norms)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert all(optimizer.defaults["fused"] is True for optimizer in cli.trainer.optimizers)
    assert str(cli.trainer.precision) == "bf16-mixed"
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert norms.norms and all(norm <= 0.001 * 1.001 for norm in norms.norms), norms.norms


def test_a_module_must_name_what_it_trains() -> None:
    """``trained`` (the parameters counted in the HPARAMS view) is abstract: a module that does not say is refused."""

    class Incomplete(PartsModule):
        pass

    with pytest.raises(TypeError, match="trained"):
        Incomplete()
