"""Config inheritance: a config file that starts with ``extends: BASE`` (a path relative to the file) is read as if
the command line gave ``--config BASE --config FILE``, so jsonargparse's own merge applies (dicts merge key by key, a
list replaces the base's list, ``callbacks+`` appends to it). A base may extend another; a cycle is refused.

The command line is expanded before LightningCLI parses it; the expansion depends only on the files, so the DDP
ranks that Lightning starts by re-running ``sys.argv`` expand it the same way. After each expanded ``--config``
comes ``--extends=null``: the parsed configuration (``--print_config``, the ``config.yaml`` saved into a run
directory) holds no path that would be resolved again relative to another folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffusion_pl.cli.errors import read_config_file
from diffusion_pl.core.errors import ConfigError

#: The key of a config file that names its base config.
EXTENDS = "extends"
#: What follows every expanded ``--config``: the key read, nothing is left to resolve again.
CLEAR = f"--{EXTENDS}=null"
_CONFIG_OPTIONS = ("--config", "-c")


def base_of(path: Path) -> Path | None:
    """The config that the config file at ``path`` extends (its ``extends:`` relative to the file), or None.

    Raises:
        ConfigError: The file is not valid YAML, or ``extends`` is not a path.
    """
    content = read_config_file(path)
    if not isinstance(content, dict) or content.get(EXTENDS) is None:
        return None
    base = content[EXTENDS]
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {path}: `{EXTENDS}: {base!r}` is not a path; write the path of the config it "
                          "builds on, relative to this file (e.g. `extends: ../ddpm/fashion_mnist.yaml`)")
    return path.parent / base


def config_chain(path: Path) -> list[Path]:
    """The config at ``path`` preceded by the configs it extends, the first base first.

    Raises:
        ConfigError: A base that is missing or extends a config of its own chain (a cycle); the message names the
            files.
    """
    chain = [path]
    while (base := base_of(chain[0])) is not None:
        if not base.is_file():
            via = " <- ".join(str(p) for p in chain)
            raise ConfigError(f"config file {chain[0]} extends {base}, which does not exist (chain: {via}); "
                              f"`{EXTENDS}:` is a path relative to the folder of the file that names it")
        if base.resolve() in {p.resolve() for p in chain}:
            cycle = " -> ".join(str(p) for p in [*reversed(chain), base])
            raise ConfigError(f"config files extend each other in a cycle: {cycle}; remove `{EXTENDS}:` from one of "
                              "them")
        chain.insert(0, base)
    return chain


def _expanded(value: str) -> list[str]:
    path = Path(value)
    if not path.is_file():
        return [value]  # a YAML string, or a missing file that jsonargparse reports
    chain = config_chain(path)
    if len(chain) == 1:
        return [value]
    return [*(str(p) for p in chain[:-1]), value]


def _config_option(args: Sequence[str], i: int) -> list[str] | None:
    """The ``--config FILE`` (``-c FILE``, ``--config=FILE``) option at ``args[i]``, as written, or None."""
    if args[i:i + 1] and args[i] in _CONFIG_OPTIONS and i + 1 < len(args):
        return list(args[i:i + 2])
    if args[i:i + 1] and args[i].startswith("--config="):
        return [args[i]]
    return None


def expand_extends(args: Sequence[str], subcommands: Sequence[str] = ()) -> list[str]:
    """``args`` with every ``--config FILE`` (``--config=FILE``, ``-c FILE``) whose file extends another replaced by
    ``--config`` for each config of its chain, then :data:`CLEAR`. With ``subcommands``, only the options after the
    first of them are expanded (those of the subcommand's parser, which has the ``extends`` key). Expanding the
    result again changes nothing (``--config`` options followed by :data:`CLEAR` are
    taken as expanded).

    Raises:
        ConfigError: A config of a chain is not valid YAML, is missing or closes a cycle.
    """
    args = list(args)
    start = next((i + 1 for i, arg in enumerate(args) if arg in subcommands), 0 if not subcommands else len(args))
    out, i = args[:start], start
    while i < len(args):
        given = _config_option(args, i)
        if given is None:
            out.append(args[i])
            i += 1
            continue
        end = i
        while (following := _config_option(args, end)) is not None:  # a run of --config options
            end += len(following)
        if args[end:end + 1] == [CLEAR]:  # expanded before: as it is
            out += args[i:end + 1]
            i = end + 1
            continue
        i += len(given)
        value = given[-1].partition("=")[2] if len(given) == 1 else given[1]
        chain = _expanded(value)
        if len(chain) == 1:
            out += given  # as written
        else:
            out += [*(item for path in chain for item in ("--config", path)), CLEAR]
    return out
