"""Helpers for multi-process tests (DDP, SLURM): a probe callback that every rank runs, and readers of what it
and TensorBoard wrote.

The probe is used as ``--trainer.callbacks+=ddp_probe.RankProbe`` (or in a callbacks config) with this directory
on PYTHONPATH: Lightning's DDP launcher and srun start fresh interpreters, so it must be importable by name.
Every rank appends ``<restart> <global_step> <loss> <image sum>`` to ``<default_root_dir>/probe/rank{r}_steps.txt``
after each optimizer step and saves its EMA and raw weights to ``rank{r}_weights.pt`` when training ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from diffusion_pl.callbacks import averaged_module

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
DDPM_FASHION = str(REPO / "configs" / "ddpm" / "fashion_mnist.yaml")

# A tiny UNet on the bundled 8x8 digits with T = 100: a step takes a fraction of a second per CPU process.
TINY_OVERRIDES = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.net.init_args.base_channels=16",
    "--model.init_args.net.init_args.channel_mult=[1,2]",
    "--model.init_args.net.init_args.num_res_blocks=1",
    "--model.init_args.net.init_args.attention_resolutions=[4]",
    "--model.init_args.process.init_args.num_steps=100",
    "--model.init_args.sampler.steps=5",
    "--data.init_args.source=diffusion_pl.data.Digits",
    "--data.init_args.image_format.image_size=8",
    "--data.init_args.image_format.channels=1",
    "--data.init_args.image_format.resize_mode=resize",
    "--data.init_args.batch_size=64",
    "--trainer.log_every_n_steps=1",
    "--trainer.limit_val_batches=2",
]


def probe_dir(root: str | Path) -> Path:
    return Path(root) / "probe"


class RankProbe(pl.Callback):
    """Records every rank's steps, losses, batch fingerprints and final weights (see the module docstring)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        line = f"{restart} {trainer.global_step} {float(outputs['loss']):.9g} {float(batch['image'].sum()):.6f}\n"
        path = probe_dir(trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / f"rank{trainer.global_rank}_steps.txt", "a") as file:
            file.write(line)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = averaged_module(trainer, pl_module)
        weights = {"ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
                   "raw": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}}
        torch.save(weights, probe_dir(trainer.default_root_dir) / f"rank{trainer.global_rank}_weights.pt")


class Pace(pl.Callback):
    """Sleeps ``seconds`` after every optimizer step, so that a signal sent from outside arrives mid-run."""

    def __init__(self, seconds: float = 0.25) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        time.sleep(self.seconds)


def write_callbacks_config(path: Path, every_n_steps: int) -> Path:
    """A config whose callback list replaces the demo's: EMA, SampleGrid and ModelCheckpoint every
    ``every_n_steps`` steps, and the probe."""
    callbacks = [
        {"class_path": "diffusion_pl.callbacks.EMA", "init_args": {"decay": 0.9}},
        {"class_path": "diffusion_pl.callbacks.SampleGrid",
         "init_args": {"every_n_steps": every_n_steps, "num_samples": 4}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": every_n_steps}},
        {"class_path": "ddp_probe.RankProbe"},
    ]
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))
    return path


def subprocess_env() -> dict[str, str]:
    """The environment for a training subprocess: the probe importable, no SLURM variables of an enclosing job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), str(REPO), env.get("PYTHONPATH")]))
    return env


def read_steps(root: str | Path, rank: int) -> list[tuple[int, int, float, float]]:
    """The probe's ``(restart, global_step, loss, image_sum)`` lines of ``rank``."""
    rows = [line.split() for line in (probe_dir(root) / f"rank{rank}_steps.txt").read_text().splitlines() if line]
    return [(int(r), int(s), float(loss), float(total)) for r, s, loss, total in rows]


def last_step(root: str | Path, rank: int = 0) -> int:
    """The last global step rank ``rank`` finished (0 before the first one)."""
    try:
        steps = read_steps(root, rank)
    except (FileNotFoundError, ValueError):
        return 0
    return steps[-1][1] if steps else 0


def scalar_steps_per_file(log_dir: Path, tag: str = "train/loss") -> list[list[int]]:
    """The steps of scalar ``tag`` in each TensorBoard event file of ``log_dir``, files in the order written.

    Each run (each restart of a requeued job) writes its own file; reading them one by one shows repeated
    steps, which TensorBoard's EventAccumulator would silently purge.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    per_file = []
    for path in log_dir.glob("events.out.tfevents.*"):
        events = list(EventFileLoader(str(path)).Load())
        steps = [e.step for e in events for value in e.summary.value if value.tag == tag]
        per_file.append((events[0].wall_time if events else 0.0, steps))
    return [steps for _, steps in sorted(per_file)]
