"""Helpers for end-to-end tests: a tiny-net CLI invocation on the bundled digits data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from diffusion_pl.cli import DiffusionCLI, build_cli

REPO = Path(__file__).resolve().parent.parent
DDPM_FASHION = str(REPO / "configs" / "ddpm" / "fashion_mnist.yaml")

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


def tiny_args(root: Path, *extra: str, config: str = DDPM_FASHION) -> list[str]:
    """CLI arguments (without the subcommand) for a tiny run of ``config`` writing under ``root``."""
    return ["--config", config, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *tiny_net(Path(config).read_text()), *TINY_DATA,
            *tiny_process(Path(config).read_text()), *tiny_text_encoder(Path(config).read_text()),
            *tiny_first_stage(Path(config).read_text()), *extra]


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


def tiny_process(config_text: str) -> list[str]:
    """The overrides that make a discrete config's process (and its sampler's steps) tiny."""
    if "DiscreteProcess" not in config_text:
        return []
    steps = [int(n) for n in re.findall(r"\n\s+steps: (\d+)", config_text)]
    return TINY_DISCRETE + (TINY_STEPS if any(n > 100 for n in steps) else [])


def tiny_cli(root: Path, *extra: str, config: str = DDPM_FASHION) -> DiffusionCLI:
    """Build (without running) the CLI for a tiny run."""
    return build_cli(tiny_args(root, *extra, config=config), run=False)


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


def run_cli_processes(commands: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run each argument list as ``python -m diffusion_pl ARGS`` in a process of its own (exit status, stdout and
    stderr as a user sees them), forked from one interpreter that imported the command line once
    (tests/forked_cli.py); the environment without SLURM variables or the debug switch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DIFFUSION_PL_DEBUG"}
    driver = subprocess.run([sys.executable, str(Path(__file__).parent / "forked_cli.py")], input=json.dumps(commands),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if driver.returncode != 0:
        raise RuntimeError(f"tests/forked_cli.py failed:\n{driver.stderr[-3000:]}")
    return [subprocess.CompletedProcess(["python", "-m", "diffusion_pl", *args], result["returncode"],
                                        result["stdout"], result["stderr"])
            for args, result in zip(commands, json.loads(driver.stdout))]
