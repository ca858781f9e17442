"""Configs written for the data module of before its parts: one error that shows the new form.

Until the data module took parts, ``data.init_args`` held a source name (``source: fashion_mnist``), its ``root``, the
image format (``image_size``, ``channels``, ...) and eight ``predict_*`` arguments. A config file or command line that
still uses them is refused before parsing, with its data arguments written in the new form: a ``source`` part, an
``image_format`` group and a ``predict`` part.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from diffusion_pl.cli.errors import config_files
from diffusion_pl.core.errors import ConfigError
from diffusion_pl.core.spec import import_class

#: The old source names and the parts that replace them (class path, init args that are always set).
OLD_SOURCES: dict[str, tuple[str, dict[str, Any]]] = {
    "fashion_mnist": ("diffusion_pl.data.FashionMNIST", {}),
    "mnist": ("diffusion_pl.data.Torchvision", {"name": "MNIST"}),
    "cifar10": ("diffusion_pl.data.Torchvision", {"name": "CIFAR10"}),
    "digits": ("diffusion_pl.data.Digits", {}),
    "image_folder": ("diffusion_pl.data.ImageFolder", {}),
    "streaming": ("diffusion_pl.data.Streaming", {}),
}
#: Old arguments that became arguments of the source part: (old name, new name), by source.
SOURCE_ARGS = {"root": "root", "download": "download", "lazy_decode": "lazy"}
STREAMING_ARGS = {"root": "url_or_dir"}
FORMAT_ARGS = ("image_size", "channels", "resize_mode", "downsample", "downsample_mode")
#: Old ``predict_*`` arguments and their names in the predict parts.
PREDICT_ARGS = {"predict_num_samples": "num", "predict_seed": "seed", "predict_labels": "labels",
                "predict_prompts": "prompts", "predict_batch_size": "batch_size", "predict_indices": "indices",
                "predict_images": "path"}
OLD_ARGS = frozenset({"source", *SOURCE_ARGS, *FORMAT_ARGS, *PREDICT_ARGS, "predict_from"})
_PREFIXES = ("--data.init_args.", "--data.")


def _is_old(key: str, value: Any) -> bool:
    """Whether ``key: value`` of ``data.init_args`` is an argument of the old data module."""
    if key == "source":
        return isinstance(value, str) and value in OLD_SOURCES
    return key in OLD_ARGS


def _predict_class(old: Mapping[str, Any]) -> str:
    if old.get("predict_images") is not None:
        return "diffusion_pl.data.ImageFiles"
    if old.get("predict_from", "seeds") not in ("seeds", "images"):
        return "diffusion_pl.data.SplitImages"
    return "diffusion_pl.data.Seeds"


def _accepted(class_path: str, init_args: Mapping[str, Any]) -> dict[str, Any]:
    """The ``init_args`` that the part at ``class_path`` takes (an old argument that did not apply is dropped)."""
    parameters = inspect.signature(import_class(class_path, "the data arguments")).parameters
    return {name: value for name, value in init_args.items() if name in parameters}


def _part(class_path: str, init_args: Mapping[str, Any]) -> Any:
    """A part as YAML names it: its class path, with its arguments when it has any."""
    init_args = _accepted(class_path, init_args)
    return {"class_path": class_path, "init_args": init_args} if init_args else class_path


def new_data_args(old: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data.init_args`` of the parts-based data module for the old ones (only what ``old`` sets)."""
    new: dict[str, Any] = {}
    source_args = {new_name: old[name] for name, new_name in
                   (STREAMING_ARGS if old.get("source") == "streaming" else SOURCE_ARGS).items() if name in old}
    if _is_old("source", old.get("source")):
        class_path, fixed = OLD_SOURCES[old["source"]]
        new["source"] = _part(class_path, {**fixed, **source_args})
    elif source_args:
        new["source"] = {"init_args": source_args}
    image_format = {name: old[name] for name in FORMAT_ARGS if name in old}
    if image_format:
        new["image_format"] = image_format
    new.update({key: value for key, value in old.items() if not _is_old(key, value)})
    predict = {new_name: old[name] for name, new_name in PREDICT_ARGS.items() if name in old}
    if old.get("predict_from") in ("train", "test"):
        predict = {"split": old["predict_from"], **predict}
    if predict or "predict_from" in old:
        new["predict"] = _part(_predict_class(old), predict)
    return new


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6, sort_keys=False).strip()[1:-1]


def data_block(init_args: Mapping[str, Any]) -> str:
    """The entries of ``data.init_args`` that replace its old arguments, one line each, under ``data: init_args:``."""
    new = new_data_args({key: value for key, value in init_args.items() if _is_old(key, value)})
    return "\n".join(["data:", "  init_args:", *(f"    {key}: {_flow(value)}" for key, value in new.items())])


def _read_yaml(path: Path) -> Any:
    """The content of a YAML file, or None when it cannot be read (the parser reports that)."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _old_init_args(path: Path) -> tuple[Path | None, Mapping[str, Any]] | None:
    """The ``data.init_args`` of a config file when they hold old arguments, with the data part file that holds them
    (None: the config itself). A config may name its data block's file (``data: ../parts/data/x.yaml``, a path
    relative to its folder) where the block used to be."""
    config = _read_yaml(path)
    data = config.get("data") if isinstance(config, Mapping) else None
    part = None
    if isinstance(data, str):  # a part file, or a class path (no such file: nothing to check)
        part = path.parent / data
        data = _read_yaml(part)
    init_args = data.get("init_args", data) if isinstance(data, Mapping) else None
    if isinstance(init_args, Mapping) and any(_is_old(k, v) for k, v in init_args.items()):
        return part, init_args
    return None


def _command_line_args(args: Sequence[str]) -> dict[str, str]:
    """The old data arguments given on the command line (``--data.init_args.KEY=VALUE`` or ``--data.KEY VALUE``)."""
    found = {}
    for i, arg in enumerate(args):
        prefix = next((p for p in _PREFIXES if arg.startswith(p)), None)
        if prefix is None:
            continue
        key, has_value, value = arg[len(prefix):].partition("=")
        if not has_value:
            value = args[i + 1] if i + 1 < len(args) else ""
        if _is_old(key, value):
            found[key] = value
    return found


def new_command_line(old: Mapping[str, str]) -> list[str]:
    """The new command-line arguments for the old ones (a part's class first, then its arguments)."""
    new = new_data_args(old)
    args = []
    for key in ("source", "predict"):
        part = new.get(key)
        if isinstance(part, str):
            args.append(f"--data.init_args.{key}={part}")
        elif part is not None:
            args += [f"--data.init_args.{key}={part['class_path']}"] if "class_path" in part else []
            args += [f"--data.init_args.{key}.{name}={value}" for name, value in part["init_args"].items()]
    args += [f"--data.init_args.image_format.{name}={value}" for name, value in new.get("image_format", {}).items()]
    return args


def check_data_form(args: Sequence[str]) -> None:
    """Refuse the old data arguments in ``--config`` files or on the command line, showing the new form.

    Raises:
        ConfigError: Old arguments are used; the message gives what to write instead.
    """
    intro = ("the data module takes parts now: a source part (data.init_args.source), an image_format group and a "
             "predict part replace source names, root, image_size/channels/... and predict_*")
    for path in config_files(args):
        if (found := _old_init_args(path)) is not None:
            part, init_args = found
            old = ", ".join(key for key, value in init_args.items() if _is_old(key, value))
            block = data_block(init_args)
            where = f"config file {path}"
            if part is not None:  # the part file holds the data value itself: its init_args at the top
                where = f"data part file {part} (named by config file {path})"
                block = "\n".join(line[2:] for line in block.splitlines()[1:])
            raise ConfigError(f"{where} uses old data arguments ({old}); {intro}. In its data block, write instead of "
                              f"them\n{block}")
    if old_args := _command_line_args(args):
        given = " ".join(f"--data.init_args.{key}={value}" for key, value in old_args.items())
        raise ConfigError(f"{given}: old data arguments; {intro}. Write\n{' '.join(new_command_line(old_args))}")
