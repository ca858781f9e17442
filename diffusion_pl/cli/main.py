"""The ``diffusion-pl`` command: a LightningCLI over every model family with one shared DataModule.

    diffusion-pl fit --config configs/ddpm/fashion_mnist.yaml [--trainer.max_steps=100 ...]
    diffusion-pl predict --config configs/ddpm/fashion_mnist.yaml --ckpt_path path/to/last.ckpt

Every run starts from ``defaults.yaml`` beside this module (seed, trainer settings, the standard callbacks, the data
class), which the config files and then the command line override (README, "Configs"). A config that starts with
``extends: BASE`` is read as ``--config BASE --config CONFIG`` (:mod:`diffusion_pl.cli.extends`).

Bad input (data, config values, checkpoints, files) exits with status 2 and one message that says what to fix;
``--debug`` or ``DIFFUSION_PL_DEBUG=1`` shows the traceback instead. A run that SIGTERM stops exits with status 143
(``fit`` after saving a checkpoint to resume from: :class:`~diffusion_pl.callbacks.TerminationCheckpoint`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion_pl.callbacks import (
    ResumeRNGState,
    RunDirectory,
    TerminationCheckpoint,
    VerifiedCheckpointIO,
)
from diffusion_pl.callbacks.preemption import TERMINATED_STATUS
from diffusion_pl.callbacks.progress import RunProgressBar
from diffusion_pl.cli.data_form import check_data_form
from diffusion_pl.cli.errors import (
    DEBUG_ENV,
    DEBUG_FLAG,
    check_config_files,
    config_error,
    message,
)
from diffusion_pl.cli.extends import EXTENDS, expand_extends
from diffusion_pl.core.checkpoint_file import read_checkpoint
from diffusion_pl.core.errors import UserError, WriteError
from diffusion_pl.core.spec import build, is_spec
from diffusion_pl.data import ImageDataModule

log = logging.getLogger(__name__)
#: What the file system says when output cannot be written: a read-only folder, no permission, a full disk or quota.
WRITE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)

# Arguments written once, in `data`, and copied into the model and its network. A model with a first stage gets
# its network's size from the stage's latent shape instead (DiffusionCLI.before_instantiate_classes).
DATA_TO_MODEL_LINKS: tuple[tuple[str, str], ...] = (
    ("data.init_args.image_format.image_size", "model.init_args.image_size"),
    ("data.init_args.image_format.channels", "model.init_args.channels"),
    ("data.init_args.image_format.image_size", "model.init_args.net.init_args.image_size"),
    ("data.init_args.image_format.channels", "model.init_args.net.init_args.in_channels"),
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


def first_stage_from_checkpoint(model: Namespace, ckpt_path: str | None) -> None:
    """Let a latent model predict on its own: when the configured first stage's file is gone, take the stage's
    architecture from the checkpoint being loaded, which holds its weights (``Autoencoder``'s ``net``)."""
    init_args = model.get("init_args")
    first_stage = None if init_args is None else init_args.get("first_stage")
    stage_args = None if first_stage is None else first_stage.get("init_args")
    if ckpt_path is None or stage_args is None or stage_args.get("net") is not None:
        return
    if "checkpoint" not in stage_args or Path(str(stage_args.checkpoint)).is_file():
        return
    stored = (read_checkpoint(ckpt_path).get("hyper_parameters") or {}).get("first_stage")
    net = (stored.get("init_args") or {}).get("net") if is_spec(stored) else None
    if net is not None:
        log.info("first stage %s not found: its architecture and weights come from %s", stage_args.checkpoint,
                 ckpt_path)
        stage_args.net = net


#: Trainer settings, callbacks, seed and data class of every run, read before the ``--config`` files.
DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
LIMIT_BATCHES = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: What building the classes of a config raises for a value they refuse.
CONFIG_VALUE_ERRORS = (ValueError, TypeError, OSError, LookupError, ImportError, RuntimeError,
                       MisconfigurationException)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Re-raise what a config value causes while classes are built as a ConfigError with the original message."""
    try:
        yield
    except UserError:
        raise
    except CONFIG_VALUE_ERRORS as error:
        raise config_error(error) from error


def with_checkpoint_io(plugins: Any) -> list[Any]:
    """The Trainer's plugins with :class:`VerifiedCheckpointIO` added, unless the config gives a CheckpointIO."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(VerifiedCheckpointIO())
    return plugins


class DiffusionCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, data->model argument links, the exact-resume callback, verified
    atomic checkpoint I/O, one directory per run and a checkpoint on SIGTERM; errors of config values come out as
    :class:`ConfigError`."""

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; an error a config value causes becomes a ConfigError with the original
        message (jsonargparse wraps it in union-type reports and a dump of the whole configuration)."""
        with config_errors():
            super().instantiate_classes()

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's configuration when ``--ckpt_path`` is given.

        LightningCLI would re-parse the config with the hyperparameters stored in the checkpoint, silently
        overriding e.g. ``--model.init_args.sampler`` or ``--model.init_args.sampler.steps`` at ``test``/``predict``. The config
        files and overrides on the command line describe the run; the Trainer still restores the weights.
        """

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer, with :class:`VerifiedCheckpointIO`, :class:`RunDirectory` first among the callbacks, the
        run-long :class:`RunProgressBar` in place of Lightning's default bar, and ``limit_*_batches: 1`` read as one
        batch.

        The Trainer annotates these ``float | int``, so the parser turns ``1`` into ``1.0``, which Lightning reads
        as 100% of the batches (``--trainer.limit_test_batches=1`` would run the whole test set). An explicit 1
        means one batch; leave the option unset (null) for all batches.
        """
        configured = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("plugins", with_checkpoint_io(configured.get("plugins")))
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.sort(key=lambda callback: not isinstance(callback, RunDirectory))  # it claims the log dir
        for callback in trainer.callbacks:
            if isinstance(callback, RunDirectory):
                callback.note_unset_versions(trainer)
        trainer.callbacks = [RunProgressBar(c.refresh_rate) if type(c) is TQDMProgressBar else c  # noqa: E721
                             for c in trainer.callbacks]
        for name in LIMIT_BATCHES:
            if getattr(trainer, name) == 1.0 and configured.get(name) == 1.0:
                setattr(trainer, name, 1)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(f"--{EXTENDS}", type=str | None, default=None,
                            help="A config file's base config, relative to the file: read as --config BASE before it "
                                 "(README, Configs). Expanded before parsing, so the parsed value is always null.")
        for source, target in DATA_TO_MODEL_LINKS:
            parser.link_arguments(source, target)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        with config_errors():
            first_stage_from_checkpoint(config.model, config.get("ckpt_path"))
            set_net_to_latent_shape(config.model)


def parser_arguments(run: bool, exit_on_error: bool) -> dict[str, Any]:
    """LightningCLI's ``parser_kwargs``: OmegaConf interpolation, and :data:`DEFAULTS_FILE` read by each subcommand's
    parser (by the main parser when there are no subcommands, ``run=False``); with ``exit_on_error=False`` every
    parser raises its errors instead of exiting."""
    parser: dict[str, Any] = {} if exit_on_error else {"exit_on_error": False}
    defaults = {"default_config_files": [glob.escape(str(DEFAULTS_FILE))]}  # a pattern: a path with [ or * is literal
    if run:
        return {"parser_mode": "omegaconf", **parser, **{name: {**parser, **defaults} for name in SUBCOMMANDS}}
    return {"parser_mode": "omegaconf", **parser, **defaults}


def build_cli(args: Sequence[str] | None = None, run: bool = True, *, exit_on_error: bool = True) -> DiffusionCLI:
    """Construct (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``.

    Args:
        args: Command-line arguments.
        run: Run the subcommand (otherwise only parse and instantiate).
        exit_on_error: Let the parser print its usage and exit on a parse error (else raise ``ArgumentError``).

    Raises:
        ConfigError: A ``--config`` file that is not valid YAML, old data arguments (the message shows the new
            form), or a config value that a class refuses.
    """
    args = list(args) if args is not None else None
    given = sys.argv[1:] if args is None else args
    # Configs that extend others become ``--config BASE --config CONFIG`` (cli/extends.py). sys.argv stays as given:
    # DDP ranks that Lightning starts re-run it and expand it alike; the resume command repeats it.
    expanded = expand_extends(given, SUBCOMMANDS if run else ())
    check_config_files(expanded)
    check_data_form(expanded)
    with warnings.catch_warnings():
        if args is None and expanded != given:  # the command line's arguments, expanded: not "args and sys.argv both"
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _diffusion_cli(args, expanded if expanded != given else args, run, exit_on_error)


def _diffusion_cli(command: list[str] | None, args: list[str] | None, run: bool, exit_on_error: bool) -> DiffusionCLI:
    """The CLI parsing ``args`` (``sys.argv`` when None); ``command``: the arguments as given, for the resume
    command that :class:`TerminationCheckpoint` writes (None: ``sys.argv``)."""
    return DiffusionCLI(
        model_class=pl.LightningModule,
        datamodule_class=ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs=parser_arguments(run, exit_on_error),
        trainer_defaults={"callbacks": [ResumeRNGState(), RunDirectory(), TerminationCheckpoint(command)]},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _take_debug_flag(args: list[str] | None) -> tuple[list[str] | None, bool]:
    """Remove ``--debug`` from ``args`` (or from ``sys.argv``: DDP ranks that Lightning starts re-run it, and get
    the environment variable instead); returns the arguments and whether tracebacks are wanted."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if args is None:
        if DEBUG_FLAG in sys.argv[1:]:
            sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != DEBUG_FLAG]
            debug = True
    elif DEBUG_FLAG in args:
        args, debug = [arg for arg in args if arg != DEBUG_FLAG], True
    if debug:
        os.environ[DEBUG_ENV] = "1"
    return args, debug


def write_error(error: OSError) -> WriteError:
    """The one-line message for output that the file system refused."""
    where = f" {error.filename}" if error.filename else ""
    return WriteError(f"cannot write{where}: {error.strerror or error}. Write elsewhere (--trainer.default_root_dir="
                      "DIR, or the callbacks' output folders) or free disk space; a training run resumes from its last "
                      "checkpoint")


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point: bad input exits with status 2 and one message (``--debug``: the traceback); a
    run Lightning stopped on SIGTERM (``validate``, ``test``) with status 143, as ``fit`` does."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arguments, debug = _take_debug_flag(None if args is None else list(args))
    try:
        build_cli(arguments, exit_on_error=False)
    except (UserError, ArgumentError) as error:
        if debug:
            raise
        sys.stderr.write(message(error))
        sys.exit(2)
    except OSError as error:  # e.g. a log folder on a read-only or full file system, raised by Lightning or torch
        if debug or error.errno not in WRITE_ERRNOS:
            raise
        sys.stderr.write(message(write_error(error)))
        sys.exit(2)
    except SIGTERMException:
        sys.exit(TERMINATED_STATUS)
