"""Power-function EMA of the weights (EDM2, Karras et al. 2024, Sec. 3.1), with snapshots for post-hoc EMA (Sec. 3.2).

How it fits Lightning's weight averaging: :class:`PowerEMA` is a :class:`~diffusion_pl.callbacks.ema.WeightAverage`,
so the average named by ``evaluate_sigma_rel`` lives in the AveragedModel and is used as the EMA's is: swapped in for
validation, used by the sample grids and FID, stored as the checkpoint's ``state_dict`` (what ``test``/``predict``
load) and restored on resume. The other averages are the callback's own tensors, saved in its checkpoint state. All
of them are updated by the callback after each optimizer step with t = the global step (beta_t of EDM2 eq. 127,
computed in float64), not through AveragedModel's ``avg_fn``, which sees only its own update count and computes in the
weights' precision; the AveragedModel's count is kept equal to t.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from diffusion_pl.callbacks.ema import WeightAverage
from diffusion_pl.callbacks.ema_snapshots import FOLDER, continue_history, write_snapshot
from diffusion_pl.callbacks.power_function import PowerAverage, sigma_rel_to_gamma
from diffusion_pl.core.errors import ConfigError

log = logging.getLogger(__name__)


class PowerEMA(WeightAverage):
    """Power-function averages of the trainable weights, one per ``sigma_rel`` (EDM2 eq. 3: the profile's width
    relative to the training time; gamma solves eq. 3), updated after every optimizer step t with
    theta_avg <- beta_t theta_avg + (1 - beta_t) theta, beta_t = (1 - 1/t)^(gamma + 1); buffers are copied from the
    model. Every ``snapshot_every_n_steps`` steps and when training ends, global rank 0 writes all averages to
    ``<log_dir>/power_ema/step_XXXXXXX.pt`` (atomic, checksummed); ``diffusion-pl-ema`` reconstructs the average of any
    sigma_rel from them. A resumed run carries the interrupted run's snapshots up to its step over into its own folder.

    Use it instead of :class:`~diffusion_pl.callbacks.EMA` (one weight averaging per run): ``overlays/power_ema.yaml``.

    Args:
        sigma_rels: The averages to track (EDM2 tracks 0.05 and 0.10), each in (0, 0.2887).
        evaluate_sigma_rel: The one validation, sample grids, FID and checkpoints use; the first of ``sigma_rels`` by
            default.
        snapshot_every_n_steps: Interval of the snapshots in optimizer steps (0: only at the end). Post-hoc EMA is
            accurate with a few dozen snapshots per run (20 gave 4e-5 relative in tests/test_power_ema.py; EDM2's
            training code stores one per 8 Mi images).
        device: Device of the averages; defaults to the training device.
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), evaluate_sigma_rel: float | None = None,
                 snapshot_every_n_steps: int = 1000, device: str | None = None) -> None:
        super().__init__(device=device)
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"PowerEMA needs one or more distinct sigma_rels, got {list(sigma_rels)}")
        for sigma_rel in self.sigma_rels:
            sigma_rel_to_gamma(sigma_rel)
        self.evaluate_sigma_rel = self.sigma_rels[0] if evaluate_sigma_rel is None else float(evaluate_sigma_rel)
        if self.evaluate_sigma_rel not in self.sigma_rels:
            raise ValueError(f"evaluate_sigma_rel {evaluate_sigma_rel} is not one of sigma_rels {list(sigma_rels)}")
        if snapshot_every_n_steps < 0:
            raise ValueError(f"snapshot_every_n_steps must be >= 0, got {snapshot_every_n_steps}")
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.averages: list[PowerAverage] = []
        self.directory: Path | None = None
        self._previous_directory: Path | None = None
        self._last_snapshot = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build the averages when fitting: the evaluated one in the AveragedModel, the others beside it."""
        if stage == "fit":
            others = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WeightAveraging) and c is not self]
            if others:
                raise ConfigError(f"PowerEMA and {', '.join(others)} both average the weights; a run takes one weight "
                                  "averaging callback: remove the EMA from trainer.callbacks (overlays/power_ema.yaml "
                                  "replaces it)")
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.directory = Path(trainer.log_dir or trainer.default_root_dir) / FOLDER
        evaluated = dict(self._average_model.module.named_parameters())
        names = [name for name, parameter in pl_module.named_parameters() if parameter.requires_grad]
        self.averages = [PowerAverage.of(sigma_rel, {
            name: evaluated[name].detach() if sigma_rel == self.evaluate_sigma_rel else evaluated[name].detach().clone()
            for name in names}) for sigma_rel in self.sigma_rels]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.directory is not None:
            continue_history(self._previous_directory, self.directory, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After each optimizer step t (not after accumulating batches): update every average, then snapshot."""
        step = trainer.global_step
        if step == self._latest_update_step:
            return
        module = self._average_model.module
        parameters = dict(pl_module.named_parameters())
        current = {name: parameters[name].detach().to(self._device) for name in self.averages[0].weights}
        for average in self.averages:
            average.update(current, step)
        for average_buffer, buffer in zip(module.buffers(), pl_module.buffers()):
            if average_buffer.data_ptr() != buffer.data_ptr():
                average_buffer.copy_(buffer)
        self._average_model.n_averaged.fill_(step)
        self._latest_update_step = step
        if self.snapshot_every_n_steps > 0 and step % self.snapshot_every_n_steps == 0:
            self.snapshot(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._latest_update_step > 0:
            self.snapshot(trainer)

    def snapshot(self, trainer: pl.Trainer) -> None:
        """Write the averages of the current step (global rank 0, once per step)."""
        step = self._latest_update_step
        if trainer.is_global_zero and self.directory is not None and step != self._last_snapshot:
            path = write_snapshot(self.directory, step, self.averages)
            self._last_snapshot = step
            log.info("power-EMA snapshot of step %d written to %s", step, path)

    def state_dict(self) -> dict[str, Any]:
        """The step count (base class), what is tracked, the snapshot folder and the averages the checkpoint's
        ``state_dict`` does not hold."""
        return {**super().state_dict(), "sigma_rels": list(self.sigma_rels),
                "evaluate_sigma_rel": self.evaluate_sigma_rel,
                "directory": None if self.directory is None else str(self.directory.resolve()),
                "averages": {repr(a.sigma_rel): a.weights for a in self._others()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the averages of a resumed run (when fitting), which must track the same sigma_rels.

        Raises:
            ConfigError: The checkpoint tracks other sigma_rels or evaluates another one.
        """
        super().load_state_dict(state_dict)
        if not self.averages:
            return
        stored = (state_dict["sigma_rels"], state_dict["evaluate_sigma_rel"])
        if stored != (list(self.sigma_rels), self.evaluate_sigma_rel):
            raise ConfigError(f"the checkpoint's PowerEMA tracks sigma_rels {stored[0]} and evaluates {stored[1]}, "
                              f"this run {list(self.sigma_rels)} and {self.evaluate_sigma_rel}: resume with the "
                              "checkpoint's values")
        directory = state_dict["directory"]
        self._previous_directory = None if directory is None else Path(directory)
        for average in self._others():
            stored_weights: dict[str, Tensor] = state_dict["averages"][repr(average.sigma_rel)]
            for name, tensor in average.weights.items():
                tensor.copy_(stored_weights[name])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Refuse to continue power-function averages from a checkpoint that has none (their profiles start at step
        0), then restore the evaluated average and the raw weights (base class).

        Raises:
            ConfigError: Fitting from a checkpoint written without PowerEMA.
        """
        if self._average_model is not None and self.state_key not in (checkpoint.get("callbacks") or {}):
            raise ConfigError(f"checkpoint {trainer.ckpt_path} was written without PowerEMA: power-function averages "
                              "weigh every step from the first, so they cannot start from it. Resume it with the "
                              "callbacks it was trained with, or train anew with PowerEMA")
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def _others(self) -> list[PowerAverage]:
        """The averages that the AveragedModel does not hold."""
        return [a for a in self.averages if a.sigma_rel != self.evaluate_sigma_rel]
