"""The command line: every config parses and runs, overrides and links work, bad input says what to fix."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONFIGS, DDPM_FASHION, REPO, config_and_parts_text, last_checkpoint, run_cli

from diffusion_pl.callbacks.progress import RunProgressBar
from diffusion_pl.cli import build_cli
from diffusion_pl.data import DatasetNotFoundError, Digits, FashionMNIST, ImageDataModule
from diffusion_pl.samplers import DDPM

# Configs of trained models put together for predict (cascades): tests/test_cascade.py runs them on tiny stages.
PREDICT_ONLY = [config for config in CONFIGS
                if "diffusion_pl.models.CascadeModule" in config_and_parts_text(REPO / config)]
FIT_CONFIGS = [config for config in CONFIGS if config not in PREDICT_ONLY]


def test_configs_exist() -> None:
    assert "configs/ddpm/fashion_mnist.yaml" in CONFIGS and "configs/ddpm/cifar10.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_config_prints(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", config, "--print_config", tiny=False)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: diffusion_pl.models." in printed and "class_path: diffusion_pl.data.ImageDataModule" in printed


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_config_fast_dev_run(config: str, tmp_path: Path) -> None:
    cli = run_cli("fit", config, "--trainer.fast_dev_run=true", "--trainer.precision=32-true", "--trainer.devices=1",
                  "--data.init_args.num_workers=0", root=tmp_path)
    assert cli.trainer.global_step == 1
    loss = cli.trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss)) and float(loss) > 0


def test_data_arguments_are_linked_into_model_and_net(tmp_path: Path) -> None:
    cli = run_cli(None, DDPM_FASHION, root=tmp_path)
    assert cli.model.hparams.image_size == 8 and cli.model.hparams.channels == 1
    net = cli.model.denoiser.net
    assert net.image_size == 8 and net.in_channels == 1


def test_a_config_that_names_its_source_runs_after_the_defaults_file(tmp_path: Path) -> None:
    """The data source given only in config files (not on the command line, as the tiny overrides do): each
    subcommand's parser reads the defaults file first, which names the data module without a source, and must not
    refuse it before the config files are read (the README's first command failed so, when no ``--model`` option was
    given on the command line)."""
    data = tmp_path / "digits.yaml"
    data.write_text("data:\n  init_args:\n    source: diffusion_pl.data.Digits\n    image_format:\n      image_size: 8\n"
                    "      resize_mode: resize\n    batch_size: 16\n")
    cli = build_cli(["fit", "--config", DDPM_FASHION, "--config", str(data), "--trainer.fast_dev_run=true",
                     f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.datamodule.source, Digits) and cli.trainer.global_step == 1


def test_the_data_source_defaults_to_fashion_mnist() -> None:
    assert isinstance(ImageDataModule().source, FashionMNIST)


def test_omegaconf_interpolation(tmp_path: Path) -> None:
    """Interpolations are resolved inside each config file when it is loaded (jsonargparse's omegaconf mode)."""
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  init_args:\n    batch_size: 16\n    predict:\n      init_args:\n"
                     "        num: ${data.init_args.batch_size}\n")
    cli = run_cli(None, DDPM_FASHION, root=tmp_path, overlays=[extra])
    assert cli.datamodule.predict.num == 16


def test_unknown_config_key_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("fit", DDPM_FASHION, "--model.init_args.net.init_args.base_chanels=8", root=tmp_path)
    assert "base_chanels" in capsys.readouterr().err


def test_unknown_dataset_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((SystemExit, ValueError)) as info:
        run_cli("fit", DDPM_FASHION, "--data.init_args.source=diffusion_pl.data.ImageNet", "--trainer.fast_dev_run=true",
                root=tmp_path)
    message = str(info.value) + capsys.readouterr().err
    assert "diffusion_pl.data.ImageNet" in message


def test_missing_offline_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data.init_args.source.root"):
        run_cli("fit", DDPM_FASHION, "--data.init_args.source=diffusion_pl.data.Torchvision",
                "--data.init_args.source.name=CIFAR10", f"--data.init_args.source.root={tmp_path}",
                "--data.init_args.source.download=false", "--trainer.fast_dev_run=true", root=tmp_path)


def test_image_size_the_unet_cannot_downsample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((SystemExit, ValueError)) as info:
        run_cli("fit", DDPM_FASHION, "--data.init_args.image_format.image_size=9", "--trainer.fast_dev_run=true",
                root=tmp_path)
    message = str(info.value) + capsys.readouterr().err
    assert "image_size" in message and "channel_mult" in message


def test_module_entry_point_matches_console_script() -> None:
    for command in ([sys.executable, "-m", "diffusion_pl", "--help"], ["diffusion-pl", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "fit" in result.stdout and "predict" in result.stdout


def test_command_line_overrides_win_over_checkpoint_hyperparameters(tmp_path: Path) -> None:
    """`predict --ckpt_path X --model.init_args.sampler.steps=7` must sample with 7 steps, not the trained value."""
    run_cli("fit", DDPM_FASHION, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", root=tmp_path / "train")
    cli = run_cli("predict", DDPM_FASHION, "--model.init_args.sampler=DDPM", "--model.init_args.sampler.steps=7",
                  "--data.init_args.predict.num=2", root=tmp_path / "predict",
                  ckpt_path=last_checkpoint(tmp_path / "train"))
    assert isinstance(cli.model.sampler, DDPM) and cli.model.sampler.steps == 7


@pytest.mark.parametrize("stage", ["train", "val", "test", "predict"])
def test_limit_batches_one_means_one_batch(tmp_path: Path, stage: str) -> None:
    """Lightning reads the float 1.0 as 100%; the parser makes floats of `1` (the Trainer's float | int type)."""
    cli = run_cli(None, DDPM_FASHION, f"--trainer.limit_{stage}_batches=1", root=tmp_path)
    value = getattr(cli.trainer, f"limit_{stage}_batches")
    assert value == 1 and isinstance(value, int)
    half = run_cli(None, DDPM_FASHION, f"--trainer.limit_{stage}_batches=0.5", root=tmp_path)
    assert getattr(half.trainer, f"limit_{stage}_batches") == 0.5
    if stage == "test":
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        assert cli.trainer.num_test_batches == [1]


def test_progress_bar_counts_the_runs_steps_across_epochs(tmp_path: Path) -> None:
    """The training bar's total is max_steps and it reaches it although the run spans two epochs (2 batches each):
    its remaining time is the run's."""
    cli = run_cli("fit", DDPM_FASHION, "--trainer.max_steps=3", "--trainer.limit_train_batches=2",
                  "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=true", root=tmp_path)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RunProgressBar) and cli.trainer.current_epoch >= 1
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (3, 3)
