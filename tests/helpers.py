"""Helpers for end-to-end tests: the command line run in this process on tiny nets and the bundled digits data
(``run_cli``, ``run_trainer``), as real processes (``cli_process``, ``start_cli_process``, ``run_cli_processes``),
and what the runs write (``last_checkpoint``, ``read_samples``).

``run_cli("fit", config, *overrides, root=...)`` is ``diffusion-pl fit --config CONFIG ... OVERRIDES`` with the
tiny-net overrides (``tiny_args``) after the config; ``run_cli(None, ...)`` builds the CLI without running it.
``run_trainer("fit", ...)`` builds it and calls the Trainer itself, for tests that add callbacks of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

if TYPE_CHECKING:  # the command line is imported when a test runs it: tests of plain Trainers do without it
    from diffusion_pl.cli import DiffusionCLI

REPO = Path(__file__).resolve().parent.parent
DDPM_FASHION = str(REPO / "configs" / "ddpm" / "fashion_mnist.yaml")
#: The part files that configs name (a net, a data set, an optimizer, callbacks): not configs of their own.
PARTS = REPO / "configs" / "parts"
#: The configs, relative to the repository: every YAML file under configs/ but the part files.
CONFIGS = sorted(str(path.relative_to(REPO)) for path in (REPO / "configs").rglob("*.yaml")
                 if PARTS not in path.parents)
#: A line whose value names a YAML file (a part file, relative to the file that names it).
PART_REFERENCE = re.compile(r"^[ \t]*[\w+.]+:[ \t]+([^\s#'\"]+\.ya?ml)[ \t]*(?:#.*)?$", re.MULTILINE)

# Overrides that make any diffusion config run in seconds on CPU: a tiny UNet on 8x8 digits, T = 100.
TINY_NET = [
    "--model.init_args.net.init_args.base_channels=16",
    "--model.init_args.net.init_args.channel_mult=[1,2]",
    "--model.init_args.net.init_args.num_res_blocks=1",
    "--model.init_args.net.init_args.attention_resolutions=[4]",
]
# A super-resolution stage concatenates the (grayscale) low-res image.
TINY_SR = ["--model.init_args.net.init_args.cond_channels=1"]
# A CLIP's net (configs/clip) has no UNet widths: one layer per tower instead.
TINY_CLIP = [
    "--model.init_args.net.init_args.vision_layers=1",
    "--model.init_args.net.init_args.transformer_layers=1",
]
# An autoencoder's net (configs/ldm/*autoencoder*) has no attention resolutions: two 8-wide levels (8x8 -> 4x4); its
# discriminator one stride-2 layer (the 8x8 images have no room for more) on the tiny data's one channel.
TINY_AE_NET = [
    "--model.init_args.net.init_args.base_channels=8",
    "--model.init_args.net.init_args.channel_mult=[1,2]",
    "--model.init_args.net.init_args.num_res_blocks=1",
]
TINY_AE_DISCRIMINATOR = [
    "--model.init_args.discriminator.init_args.base_channels=8",
    "--model.init_args.discriminator.init_args.num_layers=1",
    "--model.init_args.discriminator.init_args.in_channels=1",
]
TINY_DATA = [
    "--data.init_args.source=diffusion_pl.data.Digits",
    "--data.init_args.image_format.image_size=8",
    "--data.init_args.image_format.channels=1",
    "--data.init_args.image_format.resize_mode=resize",
    "--data.init_args.batch_size=128",
]
# Discrete (DDPM) configs also get T = 100, so that full chains and full bounds stay cheap (and at most 100 sampling
# steps, which a sampler checks when it is built).
TINY_DISCRETE = ["--model.init_args.process.init_args.num_steps=100"]
TINY_STEPS = ["--model.init_args.sampler.steps=100"]
# The first stage of tiny latent-diffusion runs (tiny_first_stage).
TINY_AUTOENCODER = Path(tempfile.gettempdir()) / "diffusion_pl_tiny_autoencoder.ckpt"


def config_path(config: str | Path) -> str:
    """A config given by its path, absolute or relative to the repository (``configs/ddpm/cifar10.yaml``)."""
    return str(REPO / config)


def config_args(config: str | Path, overlays: Sequence[str | Path] = ()) -> list[str]:
    """``--config CONFIG`` and ``--config OVERLAY`` for each overlay (applied after the config, in order)."""
    return [arg for path in (config, *overlays) for arg in ("--config", config_path(path))]


def config_and_parts_text(path: str | Path) -> str:
    """The text of a config file followed by that of each part file it names (and those name): where the tiny-run
    overrides look for a config's classes and arguments."""
    path = Path(path)
    text = path.read_text()
    parts = [path.parent / name for name in PART_REFERENCE.findall(text)]
    return "\n".join([text, *(config_and_parts_text(part) for part in parts if part.is_file())])


def relocatable_text(path: str | Path) -> str:
    """The text of a config file with the part files it names given by absolute path: a copy written elsewhere (a
    test's variant of the config) names the same files."""
    path = Path(path)

    def absolute(match: re.Match[str]) -> str:
        start, end = match.span(1)
        line_start = match.start(0)
        line = match.group(0)
        return line[:start - line_start] + str((path.parent / match.group(1)).resolve()) + line[end - line_start:]

    return PART_REFERENCE.sub(absolute, path.read_text())


def tiny_args(root: Path, *extra: str, config: str | Path = DDPM_FASHION,
              overlays: Sequence[str | Path] = ()) -> list[str]:
    """CLI arguments (without the subcommand) for a tiny run of ``config`` (and ``overlays`` right after it, before
    the tiny overrides) writing under ``root``; ``extra`` last."""
    text = config_and_parts_text(config_path(config))
    return [*config_args(config, overlays), f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *tiny_net(text), *TINY_DATA,
            *tiny_process(text, process_text(config_path(config))),
            *tiny_text_encoder(text), *tiny_first_stage(text), *extra]


def tiny_net(config_text: str) -> list[str]:
    """The overrides that make a config's net tiny: a CLIPNet's layers, an autoencoder's (and its discriminator's)
    widths, or the UNet's (and classifier's) widths (a super-resolution stage's low-res condition gets the tiny
    data's one channel)."""
    if "diffusion_pl.nets.clip.CLIPNet" in config_text:
        return TINY_CLIP
    if "diffusion_pl.models.AutoencoderModule" in config_text:
        return TINY_AE_NET + (TINY_AE_DISCRIMINATOR if "PatchDiscriminator" in config_text else [])
    return TINY_NET + (TINY_SR if "LowResImage" in config_text else [])


def tiny_text_encoder(config_text: str) -> list[str]:
    """For a text-conditional config, a tiny CLIP as its Text conditioner's encoder (the configured one is a trained
    checkpoint under runs/): 64-wide towers of one layer, 8 tokens, written once per machine (atomically); the net's
    text routes get its widths."""
    if "diffusion_pl.conditioning.Text" not in config_text:
        return []
    path = Path(tempfile.gettempdir()) / "diffusion_pl_tiny_text_clip.pt"
    if not path.is_file():
        from diffusion_pl.nets.clip import CLIPNet

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            CLIPNet(image_size=8, vision_layers=1, transformer_layers=1, context_length=8).export(path)
    widths = [f"--model.init_args.net.init_args.{name}=64" for name in ("vector_dim", "context_dim")
              if f"{name}:" in config_text]  # the tiny CLIP's embedding and text widths
    return [f"--model.init_args.conditioner.init_args.encoder={path}", *widths]


def write_autoencoder_checkpoint(net: torch.nn.Module, path: Path) -> Path:
    """``net`` saved as an ``AutoencoderModule`` checkpoint stores it: its spec under ``net``, its weights under
    ``autoencoder.`` (what the ``Autoencoder`` first stage loads), with the verified-checkpoint checksum."""
    from diffusion_pl.core.checkpoint_file import write_checkpoint
    from diffusion_pl.core.spec import spec_of

    state = {f"autoencoder.{name}": value for name, value in net.state_dict().items()}
    write_checkpoint({"state_dict": state, "hyper_parameters": {"net": spec_of(net)}}, path)
    return path


def tiny_first_stage(config_text: str) -> list[str]:
    """For a latent-diffusion config, a tiny KL autoencoder (8x8x1 -> 4x4x4, untrained) as its first stage, written
    once per machine, a small latent-scale estimate, and cross-attention at the tiny net's 4x4 level."""
    if "diffusion_pl.nets.first_stage.Autoencoder" not in config_text:
        return []
    path = TINY_AUTOENCODER
    if not path.is_file():
        from diffusion_pl.nets.autoencoder import KLAutoencoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            write_autoencoder_checkpoint(KLAutoencoder(in_channels=1, latent_channels=4, base_channels=8,
                                                       channel_mult=(1, 2)), path)
    cross = (["--model.init_args.net.init_args.cross_attention_resolutions=[4]"]
             if "cross_attention_resolutions" in config_text else [])
    return [f"--model.init_args.first_stage.init_args.checkpoint={path}",
            "--model.init_args.first_stage.init_args.calibration_images=256", *cross]


def process_text(path: str | Path) -> str:
    """The YAML of the process a config trains: written in it or in the part file it names, else its base's (the
    config it ``extends``); ``null`` for a config without one."""
    path = Path(path)
    config = yaml.safe_load(path.read_text()) or {}
    process = ((config.get("model") or {}).get("init_args") or {}).get("process")
    if process is None and config.get("extends"):
        return process_text(path.parent / config["extends"])
    if isinstance(process, str) and process.endswith(".yaml"):
        return (path.parent / process).read_text()
    return yaml.safe_dump(process)


def tiny_process(config_text: str, process: str) -> list[str]:
    """The overrides that make a discrete config's process (the YAML ``process``) and its sampler's steps tiny."""
    if "DiscreteProcess" not in process:
        return []
    steps = [int(n) for n in re.findall(r"\n\s+steps: (\d+)", config_text)]
    return TINY_DISCRETE + (TINY_STEPS if any(n > 100 for n in steps) else [])


def cli_args(config: str | Path, *overrides: str, root: Path | None = None, overlays: Sequence[str | Path] = (),
             tiny: bool = True) -> list[str]:
    """The arguments (without the subcommand) of a run of ``config`` under ``root``: ``tiny_args``, or with
    ``tiny=False`` the config, overlays, root (when given) and ``overrides`` alone."""
    if tiny:
        if root is None:
            raise ValueError("a tiny run needs a root directory")
        return tiny_args(root, *overrides, config=config, overlays=overlays)
    return [*config_args(config, overlays), *([f"--trainer.default_root_dir={root}"] if root is not None else []),
            *overrides]


def run_cli(subcommand: str | None, config: str | Path, *overrides: str, root: Path | None = None,
            overlays: Sequence[str | Path] = (), tiny: bool = True,
            ckpt_path: str | Path | None = None) -> DiffusionCLI:
    """``diffusion-pl SUBCOMMAND`` of ``config`` in this process, as the command line runs it (the parser sees
    ``--ckpt_path``); the CLI afterwards. ``subcommand=None`` builds the CLI (model, data, Trainer) without running
    anything (LightningCLI's ``run=False``, which has no ``--ckpt_path``). Arguments: ``cli_args``. Parse errors exit
    (``SystemExit``) as on the command line; other errors are raised."""
    from diffusion_pl.cli import build_cli

    args = cli_args(config, *overrides, root=root, overlays=overlays, tiny=tiny)
    if subcommand is None:
        if ckpt_path is not None:
            raise ValueError("a CLI built without a subcommand takes no ckpt_path: give it to run_trainer")
        return build_cli(args, run=False)
    return build_cli([subcommand, *args, *([f"--ckpt_path={ckpt_path}"] if ckpt_path is not None else [])])


def run_trainer(method: str, config: str | Path, *overrides: str, root: Path | None = None,
                overlays: Sequence[str | Path] = (), tiny: bool = True, ckpt_path: str | Path | None = None,
                callbacks: Sequence[pl.Callback] = (), prepend: Sequence[pl.Callback] = (),
                settings: Mapping[type, Mapping[str, Any]] | None = None, remove: tuple[type, ...] = (),
                configure: Callable[[DiffusionCLI], object] | None = None) -> DiffusionCLI:
    """Build the CLI (``run_cli(None, ...)``), adapt its Trainer and call ``trainer.<method>`` (fit, validate, test
    or predict, the last without returning predictions) on its model and data; the CLI afterwards.

    For tests that watch or steer a run from inside: ``callbacks`` are appended to the Trainer's, ``prepend`` put
    first (in order), ``settings`` sets attributes of configured callbacks by type (``set_callback``), callbacks of
    the types in ``remove`` are dropped, then ``configure(cli)`` runs. ``ckpt_path`` goes to the Trainer method (the
    parser never sees it, unlike ``run_cli``'s)."""
    cli = run_cli(None, config, *overrides, root=root, overlays=overlays, tiny=tiny)
    for kind, attributes in (settings or {}).items():
        set_callback(cli, kind, **attributes)
    if remove:
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, remove)]
    cli.trainer.callbacks[:0] = list(prepend)
    cli.trainer.callbacks.extend(callbacks)
    if configure is not None:
        configure(cli)
    options = {"return_predictions": False} if method == "predict" else {}
    getattr(cli.trainer, method)(cli.model, datamodule=cli.datamodule,
                                 ckpt_path=None if ckpt_path is None else str(ckpt_path), **options)
    return cli


def tiny_cli(root: Path, *extra: str, config: str | Path = DDPM_FASHION) -> DiffusionCLI:
    """Build (without running) the CLI for a tiny run: ``run_cli(None, config, *extra, root=root)``."""
    return run_cli(None, config, *extra, root=root)


def last_checkpoint(root: Path) -> Path:
    """The ``last.ckpt`` a run under ``root`` wrote."""
    return next(root.rglob("last.ckpt"))


def read_samples(root: Path, *, grid: bool = False) -> dict[str, np.ndarray]:
    """The arrays of the ``samples.npz`` that a ``predict`` under ``root`` wrote; ``grid``: check that it wrote a
    non-empty ``grid.png`` too."""
    if grid:
        assert next(root.rglob("grid.png")).stat().st_size > 0
    with np.load(next(root.rglob("samples.npz"))) as arrays:
        return dict(arrays)


def predict_samples(config: str | Path, *overrides: str, root: Path, ckpt_path: str | Path | None = None,
                    overlays: Sequence[str | Path] = (), tiny: bool = True,
                    grid: bool = False) -> dict[str, np.ndarray]:
    """``run_cli("predict", ...)``; the arrays of the samples.npz it wrote (``read_samples``)."""
    run_cli("predict", config, *overrides, root=root, overlays=overlays, tiny=tiny, ckpt_path=ckpt_path)
    return read_samples(root, grid=grid)


def sample_grid(every_n_steps: int = 0, num_samples: int = 4) -> dict[type, dict[str, int]]:
    """``run_trainer``'s ``settings`` for the configured ``SampleGrid``: a grid of ``num_samples`` images every
    ``every_n_steps`` steps (0: none during training)."""
    from diffusion_pl.callbacks import SampleGrid

    return {SampleGrid: {"every_n_steps": every_n_steps, "num_samples": num_samples}}


def set_callback(cli: DiffusionCLI, kind: type, **attributes: Any) -> pl.Callback:
    """Set attributes of the instantiated callback of type ``kind`` (the CLI's list syntax addresses by position)."""
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, kind))
    for name, value in attributes.items():
        setattr(callback, name, value)
    return callback


class LossRecorder(pl.Callback):
    """Records the training loss of every step, keyed by global step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class Crash(pl.Callback):
    """Simulates a killed job: raises when step ``at`` + 1 would start (after step ``at`` was checkpointed)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def cli_env() -> dict[str, str]:
    """The environment of a ``python -m diffusion_pl`` process: the checkout and the test probes (ddp_probe)
    importable, no SLURM variables of an enclosing job, no debug switch (messages as a user sees them)."""
    from ddp_probe import subprocess_env

    return {k: v for k, v in subprocess_env().items() if k != "DIFFUSION_PL_DEBUG"}


def start_cli_process(*args: str, **popen: Any) -> subprocess.Popen:
    """``python -m diffusion_pl ARGS`` started in a process group of its own (``os.killpg`` ends it and the ranks
    it starts), from the repository with ``cli_env()``; stdout and stderr together in ``stdout`` unless ``popen``
    says otherwise."""
    options = {"cwd": REPO, "env": cli_env(), "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True,
               "start_new_session": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "diffusion_pl", *args], **options)


def cli_process(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m diffusion_pl ARGS`` (``start_cli_process``) to its end; its exit status, stdout and stderr.
    A run past ``timeout`` seconds (a hang, e.g. a collective on one DDP rank only) is killed with its process
    group and fails the test; ``check``: so does a non-zero exit status."""
    process = start_cli_process(*args, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"`diffusion-pl {' '.join(args[:1])}` did not finish in {timeout} s (a hang?):\n"
                    f"{(stdout + stderr)[-5000:]}")
    if check:
        assert process.returncode == 0, f"exit status {process.returncode}:\n{stdout[-3000:]}{stderr[-5000:]}"
    return subprocess.CompletedProcess(["python", "-m", "diffusion_pl", *args], process.returncode, stdout, stderr)


def fit_bare(model: pl.LightningModule, datamodule: pl.LightningDataModule, root: Path, *, every_n_steps: int,
             ckpt_path: str | None = None, **trainer_options: Any) -> pl.Trainer:
    """Fit ``model`` for 2 epochs with a bare CPU Trainer (no logger, bar, summary or sanity check), no CLI: a
    first run (no ``ckpt_path``) saves a checkpoint every ``every_n_steps`` steps under ``root``, a resumed one
    none."""
    saving = ckpt_path is None
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every_n_steps, save_top_k=-1)]
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
                         enable_checkpointing=saving, callbacks=callbacks if saving else [], **trainer_options)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def run_cli_processes(commands: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run each argument list as ``python -m diffusion_pl ARGS`` in a process of its own (exit status, stdout and
    stderr as a user sees them), forked from one interpreter that imported the command line once
    (tests/forked_cli.py); the environment ``cli_env()``."""
    driver = subprocess.run([sys.executable, str(Path(__file__).parent / "forked_cli.py")], input=json.dumps(commands),
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if driver.returncode != 0:
        raise RuntimeError(f"tests/forked_cli.py failed:\n{driver.stderr[-3000:]}")
    return [subprocess.CompletedProcess(["python", "-m", "diffusion_pl", *args], result["returncode"],
                                        result["stdout"], result["stderr"])
            for args, result in zip(commands, json.loads(driver.stdout))]
