"""The ``diffusion-pl`` command: a LightningCLI over every model family with one shared DataModule.

    diffusion-pl fit --config configs/ddpm/fashion_mnist.yaml [--trainer.max_steps=100 ...]
    diffusion-pl predict --config configs/ddpm/fashion_mnist.yaml --ckpt_path path/to/last.ckpt
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diffusion_pl.callbacks import ResumeRNGState
from diffusion_pl.data import ImageDataModule
from diffusion_pl.nets.spec import build

# Arguments written once, in `data`, and copied into the model and its network. A model with a first stage gets
# its network's size from the stage's latent shape instead (DiffusionCLI.before_instantiate_classes).
DATA_TO_MODEL_LINKS: tuple[tuple[str, str], ...] = (
    ("data.init_args.image_size", "model.init_args.image_size"),
    ("data.init_args.channels", "model.init_args.channels"),
    ("data.init_args.image_size", "model.init_args.net.init_args.image_size"),
    ("data.init_args.channels", "model.init_args.net.init_args.in_channels"),
)


def set_net_to_latent_shape(model: Namespace) -> None:
    """Give the network of a model with a first stage the stage's latent (C', H', W') of the data's images."""
    init_args = model.get("init_args")
    first_stage = None if init_args is None else init_args.get("first_stage")
    if first_stage is None:
        return
    stage = build(first_stage.as_dict() if isinstance(first_stage, Namespace) else first_stage,
                  "model.init_args.first_stage")
    channels, height, _ = stage.latent_shape((init_args.channels, init_args.image_size, init_args.image_size))
    init_args.net.init_args.in_channels, init_args.net.init_args.image_size = channels, height


LIMIT_BATCHES = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


class DiffusionCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, data->model argument links and the exact-resume callback."""

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's configuration when ``--ckpt_path`` is given.

        LightningCLI would re-parse the config with the hyperparameters stored in the checkpoint, silently
        overriding e.g. ``--model.init_args.sampler`` or ``--model.init_args.sampler.steps`` at ``test``/``predict``. The config
        files and overrides on the command line describe the run; the Trainer still restores the weights.
        """

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer, with ``limit_*_batches: 1`` read as one batch.

        The Trainer annotates these ``float | int``, so the parser turns ``1`` into ``1.0``, which Lightning reads
        as 100% of the batches (``--trainer.limit_test_batches=1`` would run the whole test set). An explicit 1
        means one batch; leave the option unset (null) for all batches.
        """
        trainer = super().instantiate_trainer(**kwargs)
        configured = self._get(self.config_init, "trainer", default={})
        for name in LIMIT_BATCHES:
            if getattr(trainer, name) == 1.0 and configured.get(name) == 1.0:
                setattr(trainer, name, 1)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in DATA_TO_MODEL_LINKS:
            parser.link_arguments(source, target)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        set_net_to_latent_shape(config.model)


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> DiffusionCLI:
    """Construct (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``."""
    return DiffusionCLI(
        model_class=pl.LightningModule,
        datamodule_class=ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={"callbacks": [ResumeRNGState()]},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_cli(args)
