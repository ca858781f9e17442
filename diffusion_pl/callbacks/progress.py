"""A training progress bar over the whole run, so that its remaining time is the run's, not the epoch's."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar, whose training bar counts the run's optimizer steps up to ``trainer.max_steps``
    (when set) instead of one epoch's batches: its rate and remaining time are those of the whole run. A resumed
    run's bar starts at its step. Without ``max_steps`` it is Lightning's bar."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0:
            bar = self.train_progress_bar
            bar.total, bar.initial, bar.n = trainer.max_steps, trainer.global_step, trainer.global_step
            bar.set_description(f"Epoch {trainer.current_epoch}, step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
