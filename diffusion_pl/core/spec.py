"""Parts that describe themselves: the arguments a part was built with, as a spec a checkpoint can store.

A spec is ``{"class_path": "package.module.Class", "init_args": {...}}``, the form LightningCLI writes in YAML.
Its values are plain (numbers, strings, lists, dicts, None, nested specs), so checkpoints holding specs load with
``torch.load(weights_only=True)`` and rebuild their parts in plain Python, without a CLI or a config file.

Rebuilding a spec never runs code a file chose: a spec may only name a registered part (a :class:`Configurable`
class, which registers itself when its module is imported; this framework's modules may be imported to find one),
an optimizer or learning-rate scheduler of ``torch.optim`` (``OptimizerCallable``/``LRSchedulerCallable`` specs),
or a class the user allowed explicitly (:func:`allow_parts`, or the environment variable ``DIFFUSION_PL_ALLOW_PARTS``
for the command line). Anything else (``os.system``, ``subprocess.Popen``, ``builtins.eval``, a module with import-time
side effects) is refused with :class:`~diffusion_pl.core.errors.UntrustedPartError` before it is imported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffusion_pl.core.errors import UntrustedPartError

Spec = dict[str, Any]

#: Environment variable with class paths (or package prefixes ending in ".") that specs may construct besides the
#: registered parts, comma-separated: the command line's form of :func:`allow_parts`.
ALLOW_ENV = "DIFFUSION_PL_ALLOW_PARTS"
#: Registered parts: every Configurable subclass of an imported module, by its class path.
_REGISTRY: dict[str, type] = {}
#: What :func:`allow_parts` added.
_ALLOWED: set[str] = set()
#: Classes of these modules that are optimizers or LR schedulers may be named by specs (optimizer factories).
_TORCH_OPTIM = "torch.optim"
_OPTIM_BASES = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
_OWN_PACKAGE = "diffusion_pl"


class Configurable:
    """Mixin that records the arguments of the most derived ``__init__`` a part was constructed with.

    ``spec_of(part)`` then gives the spec that :func:`build` turns back into an equal part. The wrapped ``__init__``
    keeps its signature (``functools.wraps``), so LightningCLI/jsonargparse see the same arguments.

    Attributes:
        SETTINGS: Init args that do not change what the part's weights mean (a file path, fit-time options): a
            checkpoint whose spec differs from the config only there still fits (:func:`differences` skips them).
    """

    SETTINGS: ClassVar[tuple[str, ...]] = ()

    def recorded_init_args(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The init args the part's spec records: those it was given; a part may add what it read elsewhere (e.g.
        the architecture of a file it loaded), so that its spec rebuilds it without that file."""
        return arguments

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[class_path(cls)] = cls
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            if type(self).__init__ is recording_init:  # only the most derived class records
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[1:])
                object.__setattr__(self, "_init_args", self.recorded_init_args(arguments))

        cls.__init__ = recording_init  # type: ignore[method-assign]


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, as LightningCLI writes ``class_path``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def spec_of(value: Any) -> Any:
    """The plain description of ``value``: a spec for a :class:`Configurable` part (recursively), lists for
    sequences, dicts for mappings, the value itself for numbers, strings and None."""
    if isinstance(value, Configurable):
        init_args = getattr(value, "_init_args", None)
        if init_args is None:
            raise TypeError(f"{type(value).__name__} was not constructed through its __init__: it has no spec")
        return {"class_path": class_path(type(value)), "init_args": {k: spec_of(v) for k, v in init_args.items()}}
    if isinstance(value, (list, tuple)):
        return [spec_of(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): spec_of(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe {type(value).__name__} {value!r} in a spec: make it a Configurable part "
                    "or a plain value (number, string, list, dict)")


def is_spec(value: Any) -> bool:
    """Whether ``value`` is a ``{"class_path", "init_args"}`` mapping."""
    return isinstance(value, Mapping) and isinstance(value.get("class_path"), str)


def build(spec: Any, source: str = "the spec") -> Any:
    """Instantiate a spec (nested specs first); plain values come back as they are.

    Args:
        spec: A spec, a list/dict holding specs, or a plain value.
        source: Where the spec came from (a checkpoint path), named in errors.

    Raises:
        ValueError: A class path that cannot be imported, or arguments the class does not take.
    """
    if is_spec(spec):
        cls = import_class(spec["class_path"], source)
        init_args = {k: build(v, source) for k, v in (spec.get("init_args") or {}).items()}
        try:
            return cls(**init_args)
        except TypeError as error:
            raise ValueError(f"{source}: {spec['class_path']} rejects the stored arguments ({error})") from error
    if isinstance(spec, list):
        return [build(v, source) for v in spec]
    if isinstance(spec, Mapping):
        return {k: build(v, source) for k, v in spec.items()}
    return spec



def allow_parts(*class_paths: str) -> None:
    """Let specs (in checkpoints too) construct these classes besides the registered parts: exact class paths, or
    package prefixes ending in "." (``allow_parts("mylab.nets.")``). Only for code you trust: constructing a class can
    run anything. A part of your own is simpler as a :class:`Configurable` subclass, which registers itself when its
    module is imported. The command line reads the same list from ``DIFFUSION_PL_ALLOW_PARTS`` (comma-separated)."""
    _ALLOWED.update(class_paths)


def _user_allowed(path: str) -> bool:
    allowed = _ALLOWED | {entry.strip() for entry in os.environ.get(ALLOW_ENV, "").split(",") if entry.strip()}
    return any(path == entry or (entry.endswith(".") and path.startswith(entry)) for entry in allowed)


def _within(module_name: str, package: str) -> bool:
    return module_name == package or module_name.startswith(package + ".")


def _untrusted(path: str, source: str, why: str) -> UntrustedPartError:
    return UntrustedPartError(
        f"{source}: refusing to construct {path!r}: {why}. A spec may only name a part of diffusion_pl, a "
        "torch.optim optimizer or scheduler, or a class you allowed. If you trust this file and the class is your "
        f"own part, import its module first (a Configurable subclass registers itself), or allow it: "
        f"{ALLOW_ENV}={path} on the command line, diffusion_pl.core.spec.allow_parts({path!r}) in Python")


def import_class(path: str, source: str) -> type:
    """The class named by a ``class_path``, if a spec may construct it (see the module docstring); nothing else is
    imported.

    Raises:
        UntrustedPartError: (a ValueError) Not a registered part, optimizer, scheduler or allowed class.
        ValueError: An allowed path that cannot be imported.
    """
    if not isinstance(path, str):
        raise _untrusted(repr(path), source, "a class path must be a string")
    if path in _REGISTRY:
        return _REGISTRY[path]
    module_name, _, name = path.rpartition(".")
    allowed = _user_allowed(path)
    if not (allowed or _within(module_name, _OWN_PACKAGE) or _within(module_name, _TORCH_OPTIM)):
        raise _untrusted(path, source, "it is not a registered part of diffusion_pl (its module is not imported)")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{source}: cannot import {path!r} ({error}); was it saved by another version of "
                         "diffusion_pl?") from error
    if not inspect.isclass(found):
        raise _untrusted(path, source, f"it is a {type(found).__name__}, not a class")
    if allowed or issubclass(found, Configurable) or issubclass(found, _OPTIM_BASES):
        return found
    raise _untrusted(path, source, "it is neither a part of diffusion_pl (a Configurable class) nor a torch.optim "
                                   "optimizer or scheduler")


def factory(value: Any, source: str = "the spec") -> Any:
    """A factory from the spec of a callable argument (LightningCLI's ``OptimizerCallable``/``LRSchedulerCallable``,
    whose spec holds every argument but the first): ``functools.partial(cls, **init_args)``; other values as they
    are."""
    if not is_spec(value):
        return value
    return functools.partial(import_class(value["class_path"], source), **(value.get("init_args") or {}))


def keep_described(hparams: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Drop the entries of ``keys`` that are not specs (e.g. a Python function given as optimizer factory): a
    checkpoint keeps only what it can describe, and its module falls back to the default there."""
    for key in keys:
        if key in hparams and not is_spec(hparams[key]):
            del hparams[key]


# ----------------------------------------------------------------------------------------------- comparing specs

_MISSING = object()


def _with_defaults(spec: Spec) -> dict[str, Any]:
    """The init args of a spec with the class's defaults filled in (an older checkpoint may lack a newer argument)."""
    init_args = dict(spec.get("init_args") or {})
    try:
        parameters = inspect.signature(import_class(spec["class_path"], "the spec")).parameters.values()
    except (ValueError, TypeError):
        return init_args
    for parameter in parameters:
        if parameter.default is not inspect.Parameter.empty and parameter.name not in init_args:
            init_args[parameter.name] = spec_of(parameter.default) if _describable(parameter.default) else _MISSING
    return init_args


def _settings(path: str) -> tuple[str, ...]:
    """:attr:`Configurable.SETTINGS` of the class at ``path`` (none for a class that cannot be named)."""
    try:
        return getattr(import_class(path, "the spec"), "SETTINGS", ())
    except (ValueError, TypeError):
        return ()


def _describable(value: Any) -> bool:
    try:
        spec_of(value)
    except TypeError:
        return False
    return True


def differences(stored: Any, current: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """Where two descriptions (specs, lists, dicts, plain values) differ: ``(dotted path, stored, current)``.

    Specs of different classes differ as a whole; specs of one class differ in the init args that differ (the
    class's defaults stand in for arguments one side lacks), apart from its :attr:`Configurable.SETTINGS`. Numbers compare by value (1 == 1.0), tuples as lists.
    """
    if is_spec(stored) and is_spec(current):
        if stored["class_path"] != current["class_path"]:
            return [(where, stored, current)]
        left, right = _with_defaults(stored), _with_defaults(current)
        found = []
        for key in dict.fromkeys([*left, *right]):
            if key in _settings(stored["class_path"]):
                continue  # e.g. a file path spelled differently, a fit-time option
            a, b = left.get(key, _MISSING), right.get(key, _MISSING)
            if a is _MISSING or b is _MISSING:
                continue  # an argument one side cannot describe: nothing to compare
            found += differences(a, b, f"{where}.{key}" if where else key)
        return found
    if isinstance(stored, (list, tuple)) and isinstance(current, (list, tuple)) and len(stored) == len(current):
        return [d for i, (a, b) in enumerate(zip(stored, current)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(stored, Mapping) and isinstance(current, Mapping) and not is_spec(stored) and not is_spec(current):
        return [d for key in dict.fromkeys([*stored, *current])
                for d in differences(stored.get(key), current.get(key), f"{where}.{key}" if where else str(key))]
    if isinstance(stored, (list, tuple)) and isinstance(current, (list, tuple)):
        return [] if list(stored) == list(current) else [(where, stored, current)]
    return [] if stored == current else [(where, stored, current)]


def describe(value: Any, limit: int = 100) -> str:
    """A short readable form: ``VPSDE(beta_max=20.0)`` for a spec (the arguments that differ from the class's
    defaults), ``repr`` for plain values; cut at ``limit`` characters."""
    if is_spec(value):
        name = value["class_path"].rpartition(".")[2]
        defaults = _with_defaults({"class_path": value["class_path"], "init_args": {}})
        shown = [f"{k}={describe(v, limit)}" for k, v in (value.get("init_args") or {}).items()
                 if defaults.get(k, _MISSING) != v]
        text = f"{name}({', '.join(shown)})"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(describe(v, limit) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
