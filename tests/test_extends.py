"""Config inheritance (diffusion_pl/cli/extends.py): ``extends: BASE`` in a config is read as ``--config BASE --config
CONFIG``; chains resolve in order, cycles and missing bases are refused naming the files, and nothing of it leaks into
the parsed configuration or the config.yaml of a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import DDPM_FASHION, REPO, cli_process, last_checkpoint, read_samples, relocatable_text, run_cli
from test_config_defaults import printed_config

from diffusion_pl.cli.extends import CLEAR, expand_extends
from diffusion_pl.core.errors import ConfigError

OVERLAY = "trainer:\n  max_steps: 7\nmodel:\n  init_args:\n    net:\n      init_args:\n        num_classes: 10\n"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def base(tmp_path: Path) -> str:
    """A copy of the DDPM demo config in ``tmp_path`` (part files named by absolute path)."""
    return write(tmp_path / "base.yaml", relocatable_text(REPO / DDPM_FASHION))


def test_extends_resolves_as_two_config_files(tmp_path: Path, base: str) -> None:
    child = write(tmp_path / "child.yaml", "extends: base.yaml\n" + OVERLAY)
    overlay = write(tmp_path / "overlay.yaml", OVERLAY)
    printed = printed_config(["fit", "--config", child])
    assert printed == printed_config(["fit", "--config", base, "--config", overlay])
    assert printed["extends"] is None and printed["trainer"]["max_steps"] == 7
    assert printed["model"]["init_args"]["net"]["init_args"]["num_classes"] == 10
    assert printed["model"]["init_args"]["net"]["init_args"]["base_channels"] == 32  # the rest of the base's net


def test_a_chain_resolves_in_order(tmp_path: Path, base: str) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "child.yaml", "extends: base.yaml\n" + OVERLAY)
    grandchild = write(tmp_path / "sub" / "grandchild.yaml", "extends: ../child.yaml\ntrainer:\n  max_steps: 9\n")
    args = expand_extends(["fit", f"--config={grandchild}", "--trainer.max_steps=3"], ["fit"])
    assert args[0] == "fit" and args[1::2][:3] == ["--config"] * 3 and args[-2:] == [CLEAR, "--trainer.max_steps=3"]
    assert [Path(path).resolve() for path in args[2:7:2]] == [Path(path).resolve() for path in
                                                               (base, tmp_path / "child.yaml", grandchild)]
    assert expand_extends(args, ["fit"]) == args  # expanding again changes nothing (DDP ranks, resumed commands)
    printed = printed_config(["fit", "--config", grandchild])
    assert printed["trainer"]["max_steps"] == 9
    assert printed["model"]["init_args"]["net"]["init_args"]["num_classes"] == 10


def test_configs_without_extends_pass_unchanged(base: str) -> None:
    args = ["fit", "-c", base, f"--config={base}", "--config", "{trainer: {max_steps: 2}}"]
    assert expand_extends(args, ["fit"]) == args


def error_of(*args: str) -> str:
    """The stderr of ``diffusion-pl ARGS``, which must exit with status 2 and one short message."""
    result = cli_process(*args, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) <= 14
    return result.stderr


def test_a_cycle_is_refused_naming_the_files(tmp_path: Path) -> None:
    first = write(tmp_path / "first.yaml", "extends: second.yaml\ntrainer:\n  max_steps: 1\n")
    write(tmp_path / "second.yaml", "extends: first.yaml\n")
    stderr = error_of("fit", "--config", first)
    assert "cycle" in stderr and "first.yaml" in stderr and "second.yaml" in stderr
    with pytest.raises(ConfigError, match="cycle"):
        expand_extends(["--config", first])


def test_a_missing_base_is_refused_naming_the_files(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "extends: ../nowhere/base.yaml\n")
    stderr = error_of("fit", "--config", child)
    assert "child.yaml" in stderr and "nowhere/base.yaml" in stderr and "does not exist" in stderr


def test_a_base_that_is_not_yaml_is_named(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "extends: base.yaml\n")
    write(tmp_path / "base.yaml", "trainer: [1,\n")
    assert "base.yaml is not valid YAML" in error_of("fit", "--config", child)


def test_the_saved_run_config_has_no_live_extends_and_predicts(tmp_path: Path, base: str) -> None:
    """The config.yaml saved into a run directory holds ``extends: null``: ``--config`` of it from elsewhere reads no
    base again, and predicts with the run's checkpoint."""
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrainer:\n  max_steps: 2\n")
    run_cli("fit", child, "--trainer.max_steps=2", root=tmp_path / "run")
    saved = next((tmp_path / "run").rglob("config.yaml"))
    assert yaml.safe_load(saved.read_text())["extends"] is None
    run_cli("predict", saved, "--data.init_args.predict.init_args.num=2", root=tmp_path / "predict",
            ckpt_path=last_checkpoint(tmp_path / "run"))
    assert len(read_samples(tmp_path / "predict")["samples"]) == 2
