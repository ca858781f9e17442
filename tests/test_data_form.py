"""Configs of the data module before its parts (issue 26): the error shows the data block the configs now hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusion_pl.cli import build_cli
from diffusion_pl.cli.data_form import check_data_form, new_command_line, new_data_args
from diffusion_pl.cli.errors import check_config_files
from diffusion_pl.core.errors import ConfigError
from helpers import CONFIGS, REPO

#: Data arguments of configs and overlays as they were written before the parts.
OLD = {
    "configs/ddpm/fashion_mnist.yaml": """
      source: fashion_mnist
      image_size: 32
      channels: 1
      resize_mode: pad
      batch_size: 64
      predict_num_samples: 64""",
    "configs/sde/ve_cifar10.yaml": """
      source: cifar10
      image_size: 32
      channels: 3
      resize_mode: resize
      random_flip: true
      val_fraction: 0.01
      batch_size: 128
      num_workers: 4
      predict_num_samples: 50000
      predict_batch_size: 500""",
    "configs/cascade/image_folder_base32.yaml": """
      source: image_folder
      root: data/images
      image_size: 32
      downsample: 4
      channels: 3
      resize_mode: resize
      random_flip: true
      val_fraction: 0.01
      batch_size: 128
      num_workers: 8""",
    "overlays/inpaint.yaml": """
      predict_from: test
      predict_num_samples: 16""",
    "overlays/interpolate.yaml": """
      predict_from: test
      predict_num_samples: 8
      predict_batch_size: 8""",
    "overlays/streaming.yaml": """
      source: streaming
      root: data/optimized
      num_workers: 4""",
}


def data_init_args(path: Path) -> dict:
    """The ``data.init_args`` of a config or overlay: written in it, in the data part file it names, or (when it has
    no data block) in the config it extends; a value given as a part file (``source: ../parts/...``) read from it."""
    config = yaml.safe_load(path.read_text())
    if "data" not in config:
        return data_init_args(path.parent / config["extends"])
    data = config["data"]
    if isinstance(data, str):  # a part file (configs/parts/data), relative to the config
        path = path.parent / data
        data = yaml.safe_load(path.read_text())
    return {key: yaml.safe_load((path.parent / value).read_text())  # a part file of the source, say
            if isinstance(value, str) and value.endswith(".yaml") else value for key, value in data["init_args"].items()}


@pytest.mark.parametrize("path", sorted(OLD))
def test_old_data_arguments_translate_to_what_the_config_holds_now(path: str) -> None:
    assert new_data_args(yaml.safe_load(OLD[path])) == data_init_args(REPO / path)


def test_an_old_config_is_refused_with_its_new_data_block(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    init_args = yaml.safe_load(OLD["configs/cascade/image_folder_base32.yaml"])
    old.write_text(yaml.safe_dump({"data": {"init_args": init_args}}, sort_keys=False))
    with pytest.raises(ConfigError) as error:
        build_cli(["fit", "--config", str(REPO / "configs/cascade/image_folder_base32.yaml"), "--config", str(old)])
    message = str(error.value)
    assert message.startswith(f"config file {old} uses old data arguments (source, root, image_size, downsample, ")
    assert message.endswith("data:\n  init_args:\n"
                            "    source: {class_path: diffusion_pl.data.ImageFolder, init_args: {root: data/images}}\n"
                            "    image_format: {image_size: 32, channels: 3, resize_mode: resize, downsample: 4}")


def test_a_data_part_file_with_old_arguments_is_refused_naming_it(tmp_path: Path) -> None:
    part = tmp_path / "parts" / "old_data.yaml"
    part.parent.mkdir()
    part.write_text("class_path: diffusion_pl.data.ImageDataModule\ninit_args:\n  source: digits\n  image_size: 8\n")
    config = tmp_path / "config.yaml"
    config.write_text("data: parts/old_data.yaml\n")
    with pytest.raises(ConfigError) as error:
        check_data_form(["fit", "--config", str(config)])
    assert str(error.value).startswith(f"data part file {part} (named by config file {config}) uses old data "
                                       "arguments (source, image_size)")
    assert str(error.value).endswith("\ninit_args:\n  source: diffusion_pl.data.Digits\n"
                                     "  image_format: {image_size: 8}")


def test_configs_naming_part_files_pass_the_checks_made_before_parsing() -> None:
    """A part file's path where a config's block used to be (``data: ../parts/data/cifar10.yaml``) is valid YAML and
    no old data argument."""
    for config in CONFIGS:
        args = ["fit", "--config", str(REPO / config)]
        check_config_files(args)
        check_data_form(args)


def test_old_command_line_arguments_are_refused_with_the_new_ones() -> None:
    old = {"source": "digits", "image_size": "8", "predict_from": "test", "predict_num_samples": "4",
           "predict_labels": "[3]", "lazy_decode": "true"}
    assert new_command_line(old) == [  # arguments that no longer apply (labels of split images) are left out
        "--data.init_args.source=diffusion_pl.data.Digits", "--data.init_args.predict=diffusion_pl.data.SplitImages",
        "--data.init_args.predict.split=test", "--data.init_args.predict.num=4",
        "--data.init_args.image_format.image_size=8"]
    with pytest.raises(ConfigError, match=r"--data.init_args.root=photos: old data arguments.*\n"
                                          r"--data.init_args.source.root=photos$"):
        check_data_form(["fit", "--data.root", "photos"])
    check_data_form(["fit", "--data.init_args.source=diffusion_pl.data.Digits", "--data.init_args.source.root=x"])
