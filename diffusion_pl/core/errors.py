"""The framework's own errors: bad input a user can fix. The command line prints their message (no traceback).

Every class derives from :class:`UserError` and, where one fits, from the built-in type code already catches
(``ValueError``, ``FileNotFoundError``, ``FloatingPointError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (data, config values, files, checkpoints): the message says what was wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that the framework refuses (raised while the CLI builds the model, data and trainer)."""


class UntrustedPartError(UserError, ValueError):
    """A spec (in a checkpoint or config) that names a class this framework will not construct: not a registered
    part, optimizer or scheduler, nor allowed by the user. Nothing of it was imported or run."""


class InputShapeError(UserError, ValueError):
    """Images of another size or channel count than the network was built for."""


class DataError(UserError, ValueError):
    """A data file that cannot be used (e.g. an image that does not decode); the message names the file."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose bytes differ from those written (checksum mismatch, truncation, not a checkpoint)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint of another model than the config describes (process, prediction, net shape, first stage)."""


class WriteError(UserError, OSError):
    """An output file (checkpoint, predictions) that could not be written (full disk, read-only folder); the previous
    file at that path is unchanged and no partial file is left."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class NonFiniteError(UserError, FloatingPointError):
    """NaN/inf in the loss or the weights: training diverged; nothing non-finite is written to a checkpoint."""


class RunDirectoryInUseError(UserError, RuntimeError):
    """Another live run writes the same log or checkpoint directory."""
