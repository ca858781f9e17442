"""The one checkpoint loader: rebuild a saved part (a net, a classifier, a stage) from a checkpoint's own specs.

Every LightningModule of the framework stores its parts as specs (``nets.spec``) in its hyperparameters, so a
checkpoint describes itself: the guiding classifier, the FID domain extractor and, later, cascade stages,
autoencoders and CLIP models are all loaded here, without the config they were trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_pl.core.checkpoint_file import read_checkpoint
from diffusion_pl.core.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from diffusion_pl.core.spec import build, import_class, is_spec

#: Where a checkpoint records the class of the module that wrote it (``CheckpointChecks.on_save_checkpoint``).
MODULE_KEY = "diffusion_pl_module"
#: The module behind each net, for checkpoints written before the module was recorded.
_MODULE_OF_NET = {"UNet": "DiffusionModule", "EncoderClassifier": "ClassifierModule", "CLIPNet": "CLIPModule",
                  "KLAutoencoder": "AutoencoderModule"}


def checkpoint_module(checkpoint: dict[str, Any]) -> str | None:
    """The name of the module (``DiffusionModule``, ``ClassifierModule``, ...) that wrote ``checkpoint``: recorded in
    it, else told by its net; None if neither says."""
    recorded = checkpoint.get(MODULE_KEY)
    if isinstance(recorded, str):
        return recorded.rpartition(".")[2]
    net = (checkpoint.get("hyper_parameters") or {}).get("net")
    return _MODULE_OF_NET.get(net["class_path"].rpartition(".")[2]) if is_spec(net) else None


def wrong_kind_error(checkpoint: dict[str, Any], source: str, expected: str) -> CheckpointMismatchError | None:
    """One line saying that ``checkpoint`` was written by another module than ``expected``, or None."""
    found = checkpoint_module(checkpoint)
    if found is None or found == expected:
        return None
    return CheckpointMismatchError(f"{source}: wrong kind of checkpoint: written by {found}, expected: {expected} "
                                   "checkpoint")


def load_checkpoint(path: str | Path, *, what: str = "checkpoint", how_to_make: str = "") -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU, after verifying its checksum (``weights_only``: plain data only, no
    code runs; see :func:`diffusion_pl.core.checkpoint_file.read_checkpoint`).

    Args:
        path: The checkpoint file.
        what: What it should be, for the error (e.g. "classifier checkpoint").
        how_to_make: How to produce one, appended to the not-found error.

    Raises:
        CheckpointNotFoundError: No such file (a FileNotFoundError; the message says how to make one).
        CheckpointCorruptError: The file was changed or truncated after it was written, or is not a checkpoint
            (the message lists the other checkpoints of its directory).
        CheckpointError: The file is not a Lightning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} {path} not found" + (f": {how_to_make}" if how_to_make else ""))
    checkpoint = read_checkpoint(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{what} {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def rebuild(checkpoint: dict[str, Any], hparam: str, state_prefix: str, source: str,
            what: str = "checkpoint of this kind", expected: type | None = None) -> nn.Module:
    """The module described by ``checkpoint["hyper_parameters"][hparam]`` (a spec) with the weights stored under
    ``state_prefix`` in its state dict, on the CPU in eval mode.

    The random initialisation of the rebuilt module is overwritten, and it runs under a forked RNG: loading leaves
    the caller's random stream untouched (a training run that loads an evaluator keeps its noise).

    Args:
        checkpoint: What :func:`load_checkpoint` returned.
        hparam: The hyperparameter holding the part's spec, e.g. "net".
        state_prefix: The prefix of its weights in the state dict, e.g. "net.".
        source: The checkpoint's path, for errors.
        what: What the checkpoint should be, for errors (e.g. "ClassifierModule checkpoint").
        expected: The class the part must be (e.g. ``EncoderClassifier``): a checkpoint of another kind is refused in
            one line that says which kind it is.

    Raises:
        CheckpointError: (a ValueError) The checkpoint has no such spec, a part of another class than ``expected``
            (:class:`CheckpointMismatchError`), or weights that do not fit the rebuilt module.
    """
    spec = checkpoint.get("hyper_parameters", {}).get(hparam)
    if not is_spec(spec):
        raise CheckpointError(f"{source}: not a {what}: it describes no {hparam!r} part (saved by another module, or "
                              "by an older version of diffusion_pl)")
    if expected is not None and not issubclass(import_class(spec["class_path"], source), expected):
        found = checkpoint_module(checkpoint) or f"a model with a {spec['class_path'].rpartition('.')[2]} net"
        raise CheckpointMismatchError(f"{source}: wrong kind of checkpoint: written by {found}, expected: {what} (net "
                                      f"{expected.__name__})")
    with torch.random.fork_rng(devices=[]):
        module = build(spec, source)
    state = {k[len(state_prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(state_prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: the stored {hparam!r} weights do not fit its spec ({error})") from error
    return module.eval()
