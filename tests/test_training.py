"""End to end on CPU: fit, exact resume, EMA, TensorBoard contents, predict outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (DDPM_FASHION, REPO, Crash, LossRecorder, last_checkpoint, run_cli, run_trainer,
                     sample_grid, set_callback)
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_pl.callbacks import EMA, SampleGrid, SampleWriter

pytestmark = pytest.mark.slow


RESUME_ARGS = ("--trainer.val_check_interval=4", "--trainer.limit_val_batches=2", "--data.init_args.random_flip=true",
               "--model.init_args.net.init_args.dropout=0.1")


@pytest.mark.parametrize("interrupt_at", [6, 11])
def test_resume_reproduces_uninterrupted_losses(tmp_path: Path, interrupt_at: int) -> None:
    """11 batches per epoch: step 6 is mid-epoch (after a validation at 4), step 11 an epoch boundary.
    Losses after resuming equal the uninterrupted run's: same weights, optimizer, LR, EMA, data order,
    flips, timesteps, noise and dropout masks."""
    full, resumed = LossRecorder(), LossRecorder()
    run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=16", *RESUME_ARGS, root=tmp_path / "full",
                settings=sample_grid(), callbacks=[full])
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(SystemExit):
        run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=16", *RESUME_ARGS, root=tmp_path / "cut",
                    settings=sample_grid(), prepend=[every_step, Crash(interrupt_at)])
    last = str(tmp_path / "ckpt" / "last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == interrupt_at
    run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=16", *RESUME_ARGS, root=tmp_path / "cut", ckpt_path=last,
                settings=sample_grid(), callbacks=[resumed])
    assert sorted(resumed.losses) == list(range(interrupt_at + 1, 17))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], rel=1e-6, abs=1e-7), f"loss differs at step {step}"


def test_continuing_a_finished_run_starts_a_new_epoch(tmp_path: Path) -> None:
    """A checkpoint written when max_steps stopped training counts its epoch as done (Lightning's rule)."""
    resumed = LossRecorder()
    run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=6", "--trainer.limit_val_batches=0", root=tmp_path,
                settings=sample_grid())
    last = str(last_checkpoint(tmp_path))
    run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=9", "--trainer.limit_val_batches=0", root=tmp_path,
                ckpt_path=last, settings=sample_grid(), callbacks=[resumed])
    assert sorted(resumed.losses) == [7, 8, 9]


def test_ema_matches_closed_form_and_is_checkpointed(tmp_path: Path) -> None:
    """theta_ema after k updates = the recursion ema <- d ema + (1 - d) theta, seeded with the first weights."""
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(LossRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})

    cli = run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=5", "--trainer.limit_val_batches=0", root=tmp_path,
                      settings=sample_grid(num_samples=2), prepend=[Snapshot()])
    decay = next(c for c in cli.trainer.callbacks if isinstance(c, EMA)).decay
    expected = dict(snapshots[0])
    for snap in snapshots[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * snap[k] for k in expected}
    ckpt = torch.load(last_checkpoint(tmp_path), weights_only=False)
    for name, value in expected.items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt["current_model_state"][name], snapshots[-1][name])
    assert any((ckpt["state_dict"][k] - snapshots[-1][k]).abs().max() > 0 for k in expected)


def test_tensorboard_has_loss_and_sample_images(tmp_path: Path) -> None:
    cli = run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=4", "--trainer.log_every_n_steps=1",
                      "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                      "--model.init_args.sampler.steps=5", root=tmp_path,
                      settings=sample_grid(2))
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "val/loss" in acc.Tags()["scalars"]
    assert len(acc.Scalars("train/loss")) == 4
    assert "samples" in acc.Tags()["images"]
    assert [e.step for e in acc.Images("samples")] == [2, 4]  # the end of training at step 4 adds no second grid
    grid_cb = next(c for c in cli.trainer.callbacks if isinstance(c, SampleGrid))
    png = Image.open(grid_cb.last_path)
    assert png.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)


def test_predict_writes_grid_and_npz_reproducibly(tmp_path: Path) -> None:
    run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=2", "--trainer.limit_val_batches=0", root=tmp_path / "train",
                settings=sample_grid())
    ckpt = str(last_checkpoint(tmp_path / "train"))
    outputs = []
    for name, batch_size in (("a", 3), ("b", 5)):
        out = tmp_path / name
        run_trainer("predict", DDPM_FASHION, "--data.init_args.predict.num=7",
                    f"--data.init_args.predict.batch_size={batch_size}", "--model.init_args.sampler=DDIM",
                    "--model.init_args.sampler.steps=10", "--model.init_args.sampler.eta=0.0",
                    root=tmp_path / "predict", ckpt_path=ckpt, settings={SampleWriter: {"output_dir": str(out)}})
        samples = np.load(out / "samples.npz")["samples"]
        assert samples.shape == (7, 8, 8, 1) and samples.dtype == np.uint8
        assert Image.open(out / "grid.png").size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)
        outputs.append(samples)
    np.testing.assert_array_equal(outputs[0], outputs[1])


IMPROVED = str(REPO / "configs" / "ddpm" / "fashion_mnist_improved.yaml")


def test_improved_config_logs_val_bpd_and_test_reports_full_bound(tmp_path: Path) -> None:
    cli = run_trainer("fit", IMPROVED, "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                      "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--data.init_args.batch_size=16",
                      root=tmp_path, settings=sample_grid(num_samples=2))
    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert "val/bpd" in acc.Tags()["scalars"]
    val_bpd = acc.Scalars("val/bpd")[-1].value
    (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    # A barely trained model's bound is very loose (hundreds of bits/dim), but it is a finite positive number.
    assert math.isfinite(results["test/bpd"]) and results["test/bpd"] > 0 and math.isfinite(val_bpd) and val_bpd > 0


VP = str(REPO / "configs" / "sde" / "vp_fashion_mnist.yaml")


@pytest.mark.parametrize("sampler", ["EulerMaruyama", "PredictorCorrector", "ODE"])
def test_sde_model_samples_and_reports_ode_bpd(tmp_path: Path, sampler: str) -> None:
    own_options = [] if sampler == "ODE" else [f"--model.init_args.sampler={sampler}"]  # the config's are the ODE's
    cli = run_cli(None, VP, "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.limit_test_batches=1",
                  "--data.init_args.batch_size=8", *own_options, "--model.init_args.sampler.steps=4",
                  "--model.init_args.likelihood.ode_options={method: euler, steps: 2}", root=tmp_path)
    assert type(cli.model.sampler).__name__ == sampler and cli.model.sampler.steps == 4
    if sampler == "ODE":
        assert (cli.model.sampler.method, cli.model.sampler.spacing) == ("heun", "log_snr")
    set_callback(cli, SampleGrid, every_n_steps=0, num_samples=3)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    images = cli.model.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and bool(torch.isfinite(images).all())
    if sampler == "ODE":
        (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last")
        # An untrained model: a poor but finite likelihood; 8-bit data under a uniform model is 8 bits/dim.
        assert math.isfinite(results["test/bpd_ode"]) and results["test/bpd_ode"] > 0


def test_sampler_process_mismatch_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DDPM samples a DiscreteProcess"):
        run_cli(None, VP, "--model.init_args.sampler=DDPM", root=tmp_path)


def test_evaluation_seeds_are_distinct_for_every_rank_and_batch() -> None:
    """10^5 batches on each of 64 ranks get 6.4 million distinct seeds (``batch + 1000 * rank`` repeated one after
    1,000 batches), the same ones at every evaluation; out-of-range inputs are refused."""
    from diffusion_pl.core.seeds import evaluation_seed

    seeds = {evaluation_seed(batch, rank) for rank in range(64) for batch in range(100_000)}
    assert len(seeds) == 64 * 100_000 and max(seeds) < 2**64
    assert evaluation_seed(1000, 0) != evaluation_seed(0, 1) and evaluation_seed(7, 3) == evaluation_seed(7, 3)
    with pytest.raises(ValueError):
        evaluation_seed(-1, 0)
