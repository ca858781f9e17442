"""What a module checks when its checkpoint is written or read: finite weights, verified bytes, the same model.

:class:`CheckpointChecks` is a mixin of the framework's LightningModules:

- before every checkpoint (``on_save_checkpoint``, on every rank) the weights and their EMA copy must be finite,
  else the save is refused with the NaN error: the previous checkpoints stay the last good ones;
- a checkpoint loaded into the module (``--ckpt_path``, ``trainer.fit(ckpt_path=...)``) must describe the same
  model in the hyperparameters of ``MUST_MATCH`` (process, prediction, net, first stage, ...): otherwise one short
  error names the fields that differ, before any weight is copied;
- ``load_from_checkpoint`` verifies the file's checksum before reading it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

import torch
from torch import Tensor

from diffusion_pl.checkpoint_file import read_checkpoint, verify_file
from diffusion_pl.errors import CheckpointMismatchError, CheckpointNotFoundError, NonFiniteError
from diffusion_pl.nets.spec import describe, differences

#: The checkpoint entries that hold weights: the saved (EMA, when averaging) ``state_dict``, and the raw weights
#: that Lightning's weight averaging keeps beside them.
WEIGHT_ENTRIES = ("state_dict", "current_model_state")
_HOW_TO_FIX_DIVERGENCE = (
    "lower the learning rate (model.init_args.optimizer.init_args.lr), set trainer.gradient_clip_val (e.g. 1.0), "
    "add warm-up (model.init_args.lr_scheduler: WarmupLR with warmup_steps), or use bf16-mixed instead of 16-mixed "
    "precision; then resume from the last checkpoint written before this step")


def non_finite_error(what: str, step: int | None) -> NonFiniteError:
    """The NaN error: what went non-finite, at which step, and how to fix it."""
    at = "" if step is None else f" at step {step}"
    return NonFiniteError(f"{what}{at}: training diverged. Fix: {_HOW_TO_FIX_DIVERGENCE}")


def _floating_tensors(entry: Any) -> Iterator[tuple[str, Tensor]]:
    if isinstance(entry, Mapping):
        for name, value in entry.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                yield str(name), value


def refuse_non_finite(checkpoint: dict[str, Any]) -> None:
    """Raise the NaN error if a weight of the checkpoint (raw or EMA) is NaN or infinite.

    One host sync per device: the per-tensor flags are reduced on their device before they are read.
    """
    named = [(f"{entry}/{name}", t) for entry in WEIGHT_ENTRIES for name, t in _floating_tensors(checkpoint.get(entry))]
    by_device: dict[torch.device, list[Tensor]] = {}
    for _, tensor in named:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return
    bad = [(name, t) for name, t in named if not bool(torch.isfinite(t).all())]
    count = sum(int((~torch.isfinite(t)).sum()) for _, t in bad)
    total = sum(t.numel() for _, t in bad)
    raise non_finite_error(
        f"refusing to write a checkpoint with non-finite weights ({count} of {total} values in {len(bad)} tensors, "
        f"e.g. {bad[0][0]})", checkpoint.get("global_step"))


def mismatch_error(stored: Mapping[str, Any], current: Mapping[str, Any], fields: tuple[str, ...],
                   source: str) -> CheckpointMismatchError | None:
    """The error naming the ``fields`` whose stored value (checkpoint) differs from the current one (config), or
    None if they agree. Fields the checkpoint does not record (older checkpoints) are not compared."""
    found = [(f"{field}.{path}" if path else field, a, b) for field in fields if field in stored
             for path, a, b in differences(stored[field], current.get(field), "")]
    if not found:
        return None
    lines = [f"  {path}: {describe(a)} in the checkpoint, {describe(b)} in the config" for path, a, b in found[:8]]
    if len(found) > 8:
        lines.append(f"  ... and {len(found) - 8} more")
    config = Path(source).parent.parent / "config.yaml"
    hint = f" (--config {config})" if config.is_file() else ""
    return CheckpointMismatchError(
        f"checkpoint {source} holds another model than the config describes:\n" + "\n".join(lines) +
        f"\nPass the config it was trained with{hint}; only the sampler, guidance, likelihood, loss and optimizer "
        "may differ from it.")


class CheckpointChecks:
    """Mixin (before ``pl.LightningModule`` in the bases) that checks checkpoints written and read; see the module.

    Attributes:
        MUST_MATCH: The hyperparameters that define what the weights mean.
    """

    MUST_MATCH: ClassVar[tuple[str, ...]] = ()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_non_finite(checkpoint)
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        source = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "the checkpoint"
        error = mismatch_error(checkpoint.get("hyper_parameters") or {}, self.hparams,  # type: ignore[attr-defined]
                               self.MUST_MATCH, source)
        if error is not None:
            raise error
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path | IO, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, after verifying the file (checksum, else the archive's CRCs), with
        ``weights_only=True`` (plain data only); the parts are rebuilt from their specs (``nets.spec.build``: only
        registered parts)."""
        if isinstance(checkpoint_path, (str, Path)) and "://" not in str(checkpoint_path):
            if not Path(checkpoint_path).is_file():
                raise CheckpointNotFoundError(f"checkpoint {checkpoint_path} not found")
            if verify_file(checkpoint_path) == "unchecked":  # not a complete zip archive: damaged, or very old
                read_checkpoint(checkpoint_path)  # raises the damaged-checkpoint error if it does not load
        kwargs["weights_only"] = True
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
