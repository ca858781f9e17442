"""Exponential moving average of the weights, through Lightning's WeightAveraging; the base of every averaging."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch import Tensor, nn


@contextlib.contextmanager
def _partials_detached(module: nn.Module) -> Iterator[None]:
    """Temporarily set the module's ``functools.partial`` attributes to None, so a deep copy leaves them out.

    LightningCLI injects optimizer/scheduler factories (``OptimizerCallable``) as partials that reference the
    whole CLI: trainer, datamodule with its images, loggers and, under DDP, the launcher's process handles,
    whose locks cannot be copied (rank 0 crashed in ``AveragedModel``'s deepcopy). The averaged copy never
    configures optimizers, so it does not need them.
    """
    detached = {name: value for name, value in vars(module).items() if isinstance(value, functools.partial)}
    for name in detached:
        setattr(module, name, None)
    try:
        yield
    finally:
        for name, value in detached.items():
            setattr(module, name, value)


def frozen_submodules(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` that have parameters, none of them trainable (a first stage, a frozen
    text encoder, a guiding classifier)."""
    found = []
    for child in module.children():
        parameters = list(child.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            found.append(child)
        else:
            found.extend(frozen_submodules(child))
    return found


@contextlib.contextmanager
def _frozen_shared(module: nn.Module) -> Iterator[None]:
    """Temporarily make a deep copy of ``module`` share its frozen submodules instead of copying them: an average of
    constant weights is those weights, and a shared stage keeps what is set on it later (e.g. the latent scale that
    a first stage estimates when fitting starts, after the averaged copy is made)."""
    frozen = frozen_submodules(module)
    for part in frozen:
        object.__setattr__(part, "__deepcopy__", functools.partial(_same, part))
    try:
        yield
    finally:
        for part in frozen:
            object.__delattr__(part, "__deepcopy__")


def _same(part: nn.Module, memo: dict) -> nn.Module:
    return part


def ema_update(averaged: Tensor, current: Tensor, num_averaged: Tensor, *, decay: float) -> Tensor:
    """decay * averaged + (1 - decay) * current; a tensor shared by the model and its average (a frozen submodule)
    is returned as it is (the float rounding of the update would otherwise change it a little at every step)."""
    if averaged.data_ptr() == current.data_ptr():
        return averaged
    return decay * averaged + (1.0 - decay) * current


class WeightAverage(WeightAveraging):
    """The framework's weight averaging (:class:`EMA`, :class:`~diffusion_pl.callbacks.PowerEMA`): Lightning's
    WeightAveraging whose averaged copy lives on the training device (the base class would build it before the model
    moves to the GPU) and shares the frozen submodules (a latent model's first stage, a frozen text encoder) instead
    of copying them, and whose raw weights stay in the model after ``fit`` (use a checkpoint or
    :func:`averaged_module` for the average).

    Lightning swaps the averaged weights in for validation, stores them as the checkpoint's ``state_dict`` (so
    ``validate``/``test``/``predict`` from a checkpoint use them) and keeps the raw weights and the averaging state for
    exact resume.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._device is None:
            self._device = trainer.strategy.root_device
        with _partials_detached(pl_module), _frozen_shared(pl_module):
            super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the raw weights live when training ends.

        The base class copies the average into the model here, but ModelCheckpoint writes ``last.ckpt``
        after this hook; the raw weights would then be lost and a later ``--ckpt_path last`` with more
        steps could not resume exactly. Checkpoints still carry the average as ``state_dict``.
        """

    @property
    def averaged_module(self) -> pl.LightningModule | None:
        """The LightningModule copy holding the averaged weights, or None outside of fitting."""
        return None if self._average_model is None else self._average_model.module


class EMA(WeightAverage, EMAWeightAveraging):
    """EMA of all weights, theta_ema <- decay theta_ema + (1 - decay) theta (Ho et al. 2020 use decay 0.9999), as a
    :class:`WeightAverage`.

    Args:
        decay: EMA decay per update.
        update_every_n_steps: Update the average every N optimizer steps.
        update_starting_at_step: First optimizer step (0-based) that updates the average.
        device: Device of the averaged copy; defaults to the training device.
    """

    def __init__(self, decay: float = 0.9999, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None, device: str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(device=device, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)
        self.decay = decay
        self._kwargs["avg_fn"] = functools.partial(ema_update, decay=decay)


def averaged_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> pl.LightningModule:
    """The averaged copy of ``pl_module`` while a :class:`WeightAverage` callback (EMA, PowerEMA) is fitting, else
    ``pl_module`` itself (outside fitting, checkpoints already hold the averaged weights)."""
    for callback in trainer.callbacks:
        if isinstance(callback, WeightAverage) and callback.averaged_module is not None:
            return callback.averaged_module
    return pl_module
