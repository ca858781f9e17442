"""What a module checks when its checkpoint is written or read: finite weights, verified bytes, the same model.

:class:`CheckpointChecks` is a mixin of the framework's LightningModules:

- before every checkpoint (``on_save_checkpoint``, on every rank) the weights and their EMA copy must be finite,
  else the save is refused with the NaN error: the previous checkpoints stay the last good ones; a checkpoint with
  non-finite weights (older code, another tool) is refused when loaded as well;
- a checkpoint loaded into the module (``--ckpt_path``, ``trainer.fit(ckpt_path=...)``) must describe the same
  model in the hyperparameters of ``MUST_MATCH`` (process, prediction, net, first stage, ...): otherwise one short
  error names the fields that differ, before any weight is copied;
- ``load_from_checkpoint`` verifies the file's checksum before reading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

from diffusion_pl.core.checkpoint_file import (
    non_finite_weights,
    read_checkpoint,
    refuse_non_finite_weights,
    verify_file,
)
from diffusion_pl.core.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    NonFiniteError,
    UserError,
)
from diffusion_pl.core.spec import class_path, describe, differences
from diffusion_pl.nets.loading import MODULE_KEY, wrong_kind_error

_HOW_TO_FIX_DIVERGENCE = (
    "lower the learning rate (model.init_args.optimizer.init_args.lr), set trainer.gradient_clip_val (e.g. 1.0), "
    "add warm-up (model.init_args.lr_scheduler: WarmupLR with warmup_steps), or use bf16-mixed instead of 16-mixed "
    "precision; then resume from the last checkpoint written before this step")


def non_finite_error(what: str, step: int | None) -> NonFiniteError:
    """The NaN error: what went non-finite, at which step, and how to fix it."""
    at = "" if step is None else f" at step {step}"
    return NonFiniteError(f"{what}{at}: training diverged. Fix: {_HOW_TO_FIX_DIVERGENCE}")


def refuse_non_finite(checkpoint: dict[str, Any]) -> None:
    """Raise the NaN error if a weight of the checkpoint (raw or EMA) is NaN or infinite."""
    found = non_finite_weights(checkpoint)
    if found is not None:
        raise non_finite_error(f"refusing to write a checkpoint with non-finite weights ({found})",
                               checkpoint.get("global_step"))


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

    @staticmethod
    def upgraded_hyperparameters(stored: Mapping[str, Any]) -> Mapping[str, Any]:
        """A checkpoint's hyperparameters in today's form (a module whose arguments changed maps earlier ones)."""
        return stored

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_non_finite(checkpoint)
        checkpoint[MODULE_KEY] = class_path(type(self))
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        source = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "the checkpoint"
        refuse_non_finite_weights(checkpoint, source)
        stored = self.upgraded_hyperparameters(checkpoint.get("hyper_parameters") or {})
        error = wrong_kind_error(checkpoint, source, type(self).__name__) or mismatch_error(
            stored, self.hparams, self.MUST_MATCH, source)  # type: ignore[attr-defined]
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
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        except (ValueError, TypeError, RuntimeError) as error:  # e.g. Lightning's "blocked" for another module's class
            if not isinstance(checkpoint_path, (str, Path)) or isinstance(error, UserError):
                raise
            wrong = wrong_kind_error(read_checkpoint(checkpoint_path), str(checkpoint_path), cls.__name__)
            if wrong is None:
                raise
            raise wrong from error
