"""DDP-safe SLURM preemption: checkpoint at a step boundary on every rank when warned, then requeue the job."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)

_HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")


def next_hpc_checkpoint(directory: str | Path) -> Path:
    """``<directory>/hpc_ckpt_<N+1>.ckpt`` after the highest existing N: the name Lightning restores first."""
    directory = Path(directory)
    numbers = [int(m.group(1)) for p in directory.glob("hpc_ckpt_*.ckpt") if (m := _HPC_CKPT.search(p.name))]
    return directory / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks, else the job id."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_job(job_id: str) -> bool:
    """Run ``scontrol requeue <job_id>``; returns whether SLURM accepted it."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("could not requeue SLURM job %s: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint: training stops without end-of-training hooks."""


class SlurmRequeue(pl.Callback):
    """Save ``hpc_ckpt_N.ckpt`` and requeue the SLURM job when it is warned of its end (``sbatch --signal=USR1@T``).

    Lightning's own auto-requeue saves the checkpoint inside the signal handler, wherever each rank happens to be
    when the signal arrives. Saving calls collectives (``Trainer.save_checkpoint``'s barrier, the all-gather of
    :class:`~diffusion_pl.callbacks.ResumeRNGState`), so under DDP a rank that handles the signal while another
    is inside DDP's forward/backward communication pairs different collectives and the job deadlocks; a single
    process saves a half-done step, so resuming is not exact.

    Here the handler only records the signal. At the end of every ``check_every_n_steps``-th optimizer step all
    ranks agree (one all-reduce of a flag) on whether any rank got it; if so, every rank saves
    ``<default_root_dir>/hpc_ckpt_N.ckpt`` at that step boundary (where ModelCheckpoint saves, so the resumed
    run continues exactly). Once Lightning has sent that step's metrics to the loggers (at the next batch or
    validation start), the loggers are flushed, global rank 0 runs ``scontrol requeue`` and every rank exits
    (:class:`Preempted`; rank 0's exit status is 1 if the requeue failed), so the logged steps continue without
    gap or overlap after the restart. A validation due at the checkpointed step is skipped, as Lightning does
    when resuming from a checkpoint of that step. The requeued job runs the same command with the same
    ``default_root_dir``, where Lightning restores the newest ``hpc_ckpt_*.ckpt``.

    Installed in ``setup``, before Lightning registers its signal handlers, the handler replaces Lightning's (which
    keeps a handler it finds). It does nothing outside a SLURM job. A signal that arrives during validation is acted
    upon at the next training step, so leave the signal enough time before the limit for one validation.

    Args:
        signal_name: The warning signal (``--signal=USR1@T`` sends SIGUSR1).
        check_every_n_steps: Optimizer steps between the all-reduces of the flag.
        requeue: Requeue the job after saving (otherwise only save and stop).
    """

    def __init__(self, signal_name: str = "SIGUSR1", check_every_n_steps: int = 1, requeue: bool = True) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        if signal_name not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {signal_name!r}; use a name such as 'SIGUSR1' or 'SIGUSR2'")
        self.signum = signal.Signals[signal_name]
        self.check_every_n_steps = check_every_n_steps
        self.requeue = requeue
        self.received = False
        self._previous_handler: Any = None
        self._installed = False
        self._last_checked_step = -1
        self._exit_pending = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Only record the signal: no I/O, no collectives (the rank may be inside one)."""
        self.received = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._installed or not SLURMEnvironment.detect():
            return
        self._previous_handler = signal.signal(self.signum, self._handle)
        self._installed = True
        self._run_after_other_callbacks(trainer)
        if trainer.is_global_zero:
            log.info("SLURM preemption: on %s every rank saves %s at the end of a step and the job is requeued",
                     self.signum.name, Path(trainer.default_root_dir) / "hpc_ckpt_N.ckpt")

    def _run_after_other_callbacks(self, trainer: pl.Trainer) -> None:
        """Move this callback just before the checkpoint callbacks, so that the step's EMA update (and any other
        callback's end-of-step work) is in the preemption checkpoint, as it is in ModelCheckpoint's."""
        callbacks = [c for c in trainer.callbacks if c is not self]
        first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
        callbacks.insert(first_checkpoint, self)
        trainer.callbacks = callbacks  # a new list: Lightning is iterating over the old one to call ``setup``

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous_handler)
            self._installed = False

    def _due(self, trainer: pl.Trainer) -> bool:
        """Whether this batch ends an optimizer step at which the ranks compare flags (the same on every rank)."""
        step = trainer.global_step
        if step == self._last_checked_step or step % self.check_every_n_steps != 0:
            return False
        self._last_checked_step = step
        return True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._installed or self._exit_pending or not self._due(trainer):
            return
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.save_preemption_checkpoint(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._exit_if_pending(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_if_pending(trainer)

    def save_preemption_checkpoint(self, trainer: pl.Trainer) -> None:
        """Save ``hpc_ckpt_N.ckpt`` on all ranks at this step boundary; the job exits at the next hook.

        SIGTERM gets its default action from here on: the requeue kills the job with SIGTERM, and Lightning's
        SIGTERM handler would call a collective from inside the handler while the ranks are exiting.
        """
        path = trainer.strategy.broadcast(next_hpc_checkpoint(trainer.default_root_dir))
        if trainer.is_global_zero:
            log.info("SLURM preemption signal: saving %s at step %d", path, trainer.global_step)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        trainer.save_checkpoint(path)
        self._exit_pending = True

    def _exit_if_pending(self, trainer: pl.Trainer) -> None:
        """After the checkpointed step's metrics reached the loggers: flush them, requeue (rank 0), stop."""
        if not self._exit_pending:
            return
        for logger in trainer.loggers:
            logger.finalize("finished")
        status = 0
        if self.requeue and trainer.is_global_zero:
            job_id = slurm_job_id()
            status = 0 if job_id is not None and requeue_job(job_id) else 1
        raise Preempted(status)
