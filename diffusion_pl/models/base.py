"""PartsModule: the lifecycle every LightningModule of the framework shares.

Parts registration (the ``__init__`` arguments as hyperparameters, each injected part as its spec, so a checkpoint
describes the module and ``load_from_checkpoint`` rebuilds it), optimizers and schedules from LightningCLI's
factories, gradient clipping that also serves fused optimizers, the run's hyperparameters logged beside its metrics,
and seeded evaluation noise. The checkpoint checks come from :class:`~diffusion_pl.models.checkpointing.CheckpointChecks`.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from diffusion_pl.core.seeds import evaluation_seed
from diffusion_pl.core.spec import factory, keep_described, spec_of
from diffusion_pl.models.checkpointing import CheckpointChecks
from diffusion_pl.models.hparams import log_run_hparams


def configure_optimization(module: pl.LightningModule, optimizer: OptimizerCallable,
                           lr_scheduler: LRSchedulerCallable | None,
                           parameters: list[nn.Parameter] | None = None,
                           total_steps: int | None = None) -> dict[str, Any]:
    """The optimizer over ``parameters`` (default: the module's trainable ones) and, when given, the schedule stepped
    every optimizer step; a schedule ``total_steps`` left None becomes ``total_steps``, by default the trainer's
    total."""
    params = [p for p in module.parameters() if p.requires_grad] if parameters is None else parameters
    opt = optimizer(params)
    if lr_scheduler is None:
        return {"optimizer": opt}
    scheduler = lr_scheduler(opt)
    if getattr(scheduler, "total_steps", 0) is None:
        if total_steps is None and parameters is None:
            total = module.trainer.estimated_stepping_batches
            total_steps = int(total) if math.isfinite(total) else None
        scheduler.total_steps = total_steps
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PartsModule(CheckpointChecks, pl.LightningModule, metaclass=abc.ABCMeta):
    """Base of the framework's LightningModules: a subclass's ``__init__`` builds its parts, then calls
    :meth:`register_parts`; it names what it trains (:attr:`trained`) and its run metrics (``RUN_METRICS``)."""

    #: The metrics shown beside the hyperparameters in TensorBoard's HPARAMS view.
    RUN_METRICS: ClassVar[tuple[str, ...]] = ()

    def register_parts(self, parts: Mapping[str, Any], optimizer: OptimizerCallable,
                       lr_scheduler: LRSchedulerCallable | None) -> None:
        """Save the calling ``__init__``'s arguments as hyperparameters, the ``parts`` as their specs (so checkpoints
        load with ``weights_only=True`` and rebuild the module), dropping optimizer or schedule factories that are
        not specs (a Python function: the checkpoint keeps what it can describe); keep both factories."""
        caller = inspect.currentframe().f_back  # type: ignore[union-attr]
        self.save_hyperparameters(ignore=list(parts), logger=False, frame=caller)
        keep_described(self.hparams, ("optimizer", "lr_scheduler"))
        self.hparams.update({name: spec_of(part) for name, part in parts.items()})
        self.optimizer_factory, self.scheduler_factory = factory(optimizer), factory(lr_scheduler)

    @property
    @abc.abstractmethod
    def trained(self) -> nn.Module:
        """The module whose parameters the run trains (counted in the logged hyperparameters)."""

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping; without loss scaling (bf16-mixed, 32-bit) also for fused optimizers (``fused:
        true``), which Lightning's mixed-precision plugin refuses even when it has no grad scaler to unscale. Serves
        the trainer's ``gradient_clip_val`` and manual optimisation alike."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        algorithm = GradClipAlgorithmType((gradient_clip_algorithm or "norm").lower())
        Precision().clip_gradients(optimizer, gradient_clip_val or 0.0, algorithm)

    def on_fit_start(self) -> None:
        """Log the hyperparameters that define the run, beside its metrics (TensorBoard HPARAMS)."""
        log_run_hparams(self, self.trained, self.RUN_METRICS)

    def evaluation_seed(self, batch_idx: int) -> int:
        """The seed of an evaluation batch's noise, from (batch, rank): the same noise at every evaluation."""
        return evaluation_seed(batch_idx, self.global_rank)

    def evaluation_generator(self, batch_idx: int, device: torch.device | str | None = None) -> torch.Generator:
        """A generator (on the module's device, or ``device``) seeded by :meth:`evaluation_seed`: evaluation noise is
        comparable across evaluations and leaves the global RNG, hence exact resume, untouched."""
        generator = torch.Generator(device=self.device if device is None else device)
        return generator.manual_seed(self.evaluation_seed(batch_idx))
