"""Errors of the command line as messages: find the framework's message under jsonargparse's wrappers, check the
YAML of ``--config`` files up front, and print one readable message plus the fix.

jsonargparse wraps an error raised while it builds a class ("Does not validate against any of the Union subtypes",
"Problem with given class_path", ...) and appends the whole configuration ("Given value: Namespace(...)"); the
cause chain still holds the original exception, whose message says what was wrong and what to do.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from diffusion_pl.core.errors import ConfigError, UserError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DIFFUSION_PL_DEBUG"
#: At most this many lines of a message are printed (one screen with the hint).
MAX_LINES = 12
#: Lines of jsonargparse's messages that only repeat the configuration or list the types it tried.
_NOISE = re.compile(r"^\s*(Subtypes:|Given value type:|Given value:|- Expected a <class 'NoneType'>|Errors:\s*$|"
                    r"-?\s*Does not validate against any of the Union subtypes\s*$)")
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
_CONFIG_OPTIONS = ("--config", "-c")


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of the explicit cause chain (``raise ... from``), where the original message is."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def config_error(error: Exception) -> ConfigError:
    """A ConfigError carrying the message of the exception that a config value caused while classes were built."""
    cause = root_cause(error)
    text = str(cause).strip() or type(cause).__name__
    if not isinstance(cause, (UserError, ValueError, TypeError)):
        text = f"{type(cause).__name__}: {text}"
    return ConfigError(text)


def config_files(args: Sequence[str]) -> list[Path]:
    """The files given with ``--config FILE``, ``--config=FILE`` or ``-c FILE``."""
    found = []
    for i, arg in enumerate(args):
        if arg in _CONFIG_OPTIONS and i + 1 < len(args):
            found.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            found.append(Path(arg.partition("=")[2]))
    return found


class _StrictLoader(yaml.SafeLoader):
    """YAML loading that refuses duplicate keys, as jsonargparse does."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path) -> object:
    """The YAML content of the config file at ``path``.

    Raises:
        ConfigError: The file is not valid YAML (the message names the file, line and problem).
    """
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"config file {path} is not valid YAML: {error.problem}{where}"
                          f"{f' ({error.context})' if error.context else ''}; fix the syntax there") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML ({error}); fix the syntax there") from error


def check_config_files(args: Sequence[str]) -> None:
    """Refuse a ``--config`` file that is not valid YAML, naming the file, line and problem (jsonargparse names
    neither the file nor, for some errors, the line)."""
    for path in config_files(args):
        if path.is_file():  # else jsonargparse reports it
            read_config_file(path)


def _without_worker_traceback(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (which prepends the worker's traceback)."""
    if _WORKER_TRACEBACK not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.partition(": ")[2] or last


def message(error: BaseException) -> str:
    """The message printed for ``error``: the framework's own text, without traceback or configuration dump."""
    if isinstance(error, ArgumentError):
        text = str(root_cause(error)) if isinstance(root_cause(error), UserError) else str(error)
        hint = "see `diffusion-pl <subcommand> --help` for the options"
    else:
        text = _without_worker_traceback(str(error))
        hint = f"run with {DEBUG_FLAG}, or {DEBUG_ENV}=1, for the traceback"
    lines = [line for line in text.strip().splitlines() if line.strip() and not _NOISE.match(line)]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES] + [f"... ({len(lines) - MAX_LINES} more lines; {DEBUG_FLAG} shows all)"]
    return "error: " + "\n".join(lines) + f"\n({hint})\n"


@contextlib.contextmanager
def user_errors_exit(debug: bool = False) -> Iterator[None]:
    """Turn a :class:`UserError` raised inside into its one-screen :func:`message` on stderr and exit status 2 (a
    command's or tool's main); with ``debug`` (or ``DIFFUSION_PL_DEBUG=1``) it propagates with its traceback."""
    try:
        yield
    except UserError as error:
        if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        sys.stderr.write(message(error))
        sys.exit(2)
