"""Checkpoints at a signal, taken where every rank agrees: at the end of an optimizer step.

:class:`TerminationCheckpoint` (in every CLI run) saves ``checkpoints/sigterm_step_<N>.ckpt`` on SIGTERM and exits
with status 143; :class:`SlurmRequeue` saves ``hpc_ckpt_N.ckpt`` when SLURM warns of the job's end and requeues the
job. Both are :class:`SignalCheckpoint`: the handler records the signal, the callback acts on it at a step boundary.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from diffusion_pl.callbacks.checkpoint_io import is_local_path

log = logging.getLogger(__name__)

_HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")
#: The exit status of a run that SIGTERM stopped: 128 + 15, what a shell reports for a process SIGTERM ended.
TERMINATED_STATUS = 128 + signal.SIGTERM


def next_hpc_checkpoint(directory: str | Path) -> Path:
    """``<directory>/hpc_ckpt_<N+1>.ckpt`` after the highest existing N: the name Lightning restores first."""
    directory = Path(directory)
    numbers = [int(m.group(1)) for p in directory.glob("hpc_ckpt_*.ckpt") if (m := _HPC_CKPT.search(p.name))]
    return directory / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def checkpoint_directory(trainer: pl.Trainer) -> str:
    """The run's checkpoint directory (absolute if local): its ModelCheckpoint's ``dirpath``, else
    ``<log_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        directory = str(callback.dirpath)
    else:
        directory = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
    return os.path.abspath(directory) if is_local_path(directory) else directory


def resume_command(arguments: Sequence[str], checkpoint: str) -> str:
    """The ``diffusion-pl`` command line of ``arguments`` resuming from ``checkpoint`` (an earlier ``--ckpt_path``
    dropped)."""
    kept: list[str] = []
    skip_value = False
    for argument in arguments:
        if skip_value:
            skip_value = False
        elif argument == "--ckpt_path":
            skip_value = True
        elif not argument.startswith("--ckpt_path="):
            kept.append(argument)
    return shlex.join(["diffusion-pl", *kept, "--ckpt_path", checkpoint])


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
    """Raised on every rank after a signal's checkpoint: training stops without end-of-training hooks."""


class SignalCheckpoint(pl.Callback, abc.ABC):
    """Save a checkpoint when a signal arrives, at an optimizer-step boundary that every rank agrees on, then stop.

    Saving calls collectives (``Trainer.save_checkpoint``'s barrier, the all-gather of
    :class:`~diffusion_pl.callbacks.ResumeRNGState`), so a save inside the signal handler, wherever each rank
    happens to be, deadlocks DDP when one rank handles the signal while another is inside DDP's forward/backward
    communication; a single process would save a half-done step, and resuming would not be exact.

    Here the handler only records the signal. At the end of every ``check_every_n_steps``-th optimizer step all
    ranks agree (one all-reduce of a flag) on whether any rank got it; if so, every rank saves
    :meth:`checkpoint_path` at that step boundary (where ModelCheckpoint saves, so the resumed run continues
    exactly). Once Lightning has sent that step's metrics to the loggers (at the next batch or validation start),
    the loggers are flushed and every rank exits (:class:`Preempted`) with :meth:`exit_status`, so the logged steps
    continue without gap or overlap after a resume. A validation due at the checkpointed step is skipped, as
    Lightning does when resuming from a checkpoint of that step. A signal that arrives during validation (or the
    sanity check) is acted upon at the next training step. Subclasses install the handler (:meth:`install`) in
    ``fit`` and say where to save (:meth:`checkpoint_path`) and how to end (:meth:`exit_status`).

    Args:
        signum: The signal.
        check_every_n_steps: Optimizer steps between the all-reduces of the flag.
    """

    def __init__(self, signum: signal.Signals, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.signum = signum
        self.check_every_n_steps = check_every_n_steps
        self.received = False
        self.saved: str | None = None
        self._installed = False
        self._last_checked_step = -1

    @abc.abstractmethod
    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Where to save (called on every rank; global rank 0's answer is used)."""

    @abc.abstractmethod
    def exit_status(self, trainer: pl.Trainer) -> int:
        """The status every rank exits with once the checkpoint is saved and the loggers are flushed."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Only record the signal: no I/O, no collectives (the rank may be inside one)."""
        self.received = True

    def install(self) -> Any:
        """Make :meth:`_handle` the signal's handler; returns the handler it replaces."""
        self._installed = True
        return signal.signal(self.signum, self._handle)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._run_after_other_callbacks(trainer)

    def _run_after_other_callbacks(self, trainer: pl.Trainer) -> None:
        """Move this callback just before the checkpoint callbacks, so that the step's EMA update (and any other
        callback's end-of-step work) is in the signal's checkpoint, as it is in ModelCheckpoint's."""
        callbacks = [c for c in trainer.callbacks if c is not self]
        first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
        callbacks.insert(first_checkpoint, self)
        trainer.callbacks = callbacks  # a new list: Lightning is iterating over the old one to call ``setup``

    def _due(self, trainer: pl.Trainer) -> bool:
        """Whether this batch ends an optimizer step at which the ranks compare flags (the same on every rank)."""
        step = trainer.global_step
        if step == self._last_checked_step or step % self.check_every_n_steps != 0:
            return False
        self._last_checked_step = step
        return True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._installed or self.saved is not None or not self._due(trainer):
            return
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.save(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._exit_if_saved(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_if_saved(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Save :meth:`checkpoint_path` on all ranks at this step boundary; the run exits at the next hook."""
        path = trainer.strategy.broadcast(self.checkpoint_path(trainer))
        if trainer.is_global_zero:
            log.info("%s: saving %s at the end of step %d", self.signum.name, path, trainer.global_step)
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path

    def _exit_if_saved(self, trainer: pl.Trainer) -> None:
        """After the checkpointed step's metrics reached the loggers: flush them and stop with the exit status."""
        if self.saved is None:
            return
        for logger in trainer.loggers:
            logger.finalize("finished")
        raise Preempted(self.exit_status(trainer))


class TerminationCheckpoint(SignalCheckpoint):
    """On SIGTERM save ``<checkpoint dir>/sigterm_step_<N>.ckpt`` at the end of the step and exit with status 143.

    Schedulers end runs with SIGTERM (Kubernetes, SLURM at the time limit, ``kill``); Lightning's own handler stops
    the run at the end of the batch with exit status 0, saving nothing. Here every rank saves the checkpoint at
    the step boundary (see :class:`SignalCheckpoint`) into the run's checkpoint directory (the ModelCheckpoint's
    ``dirpath``, else ``<log_dir>/checkpoints``), global rank 0 logs the command that resumes it, and the run exits
    with status 143 (128 + SIGTERM, what a shell reports for a process SIGTERM ended), so scripts and schedulers
    see an unfinished run. A SIGTERM after the last step ends the run with status 143 when ``fit`` is done.

    The CLI adds it to every run. Lightning registers its own SIGTERM handler after ``setup``: this one replaces it
    when the sanity check or training starts (Lightning's handler stops the run without a checkpoint, and under
    DDP broadcasts from inside the handler), and Lightning puts back the handler it found when ``fit`` ends.

    Args:
        command: The ``diffusion-pl`` arguments of the run, for the resume command (default ``sys.argv[1:]``).
        check_every_n_steps: Optimizer steps between the all-reduces of the flag.
    """

    def __init__(self, command: Sequence[str] | None = None, check_every_n_steps: int = 1) -> None:
        super().__init__(signal.SIGTERM, check_every_n_steps)
        self.command = list(command) if command is not None else None

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.install()

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        return os.path.join(checkpoint_directory(trainer), f"sigterm_step_{trainer.global_step}.ckpt")

    def exit_status(self, trainer: pl.Trainer) -> int:
        """Log (global rank 0) where the checkpoint is and how to resume from it; 143."""
        if trainer.is_global_zero:
            command = sys.argv[1:] if self.command is None else self.command
            log.warning("SIGTERM: stopped at step %d with checkpoint %s (exit status %d); resume with: %s",
                        trainer.global_step, self.saved, TERMINATED_STATUS,
                        resume_command(command, self.saved))
        return TERMINATED_STATUS

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A SIGTERM that came after the last step's check: training is complete, the run still ends with 143."""
        if stage == "fit" and self.received:
            if trainer.is_global_zero:
                log.warning("SIGTERM at the end of training (step %d): training is complete; exit status %d",
                            trainer.global_step, TERMINATED_STATUS)
            raise Preempted(TERMINATED_STATUS)


class SlurmRequeue(SignalCheckpoint):
    """Save ``hpc_ckpt_N.ckpt`` and requeue the SLURM job when it is warned of its end (``sbatch --signal=USR1@T``).

    Lightning's own auto-requeue saves the checkpoint inside the signal handler, wherever each rank happens to be
    when the signal arrives, which deadlocks DDP (see :class:`SignalCheckpoint`). Here every rank saves
    ``<default_root_dir>/hpc_ckpt_N.ckpt`` at the step boundary, then global rank 0 runs ``scontrol requeue`` and
    every rank exits (rank 0's exit status is 1 if the requeue failed). The requeued job runs the same command with
    the same ``default_root_dir``, where Lightning restores the newest ``hpc_ckpt_*.ckpt``.

    Installed in ``setup``, before Lightning registers its signal handlers, the handler replaces Lightning's (which
    keeps a handler it finds). It does nothing outside a SLURM job. A signal that arrives during validation is acted
    upon at the next training step, so leave the signal enough time before the limit for one validation.

    Args:
        signal_name: The warning signal (``--signal=USR1@T`` sends SIGUSR1).
        check_every_n_steps: Optimizer steps between the all-reduces of the flag.
        requeue: Requeue the job after saving (otherwise only save and stop).
    """

    def __init__(self, signal_name: str = "SIGUSR1", check_every_n_steps: int = 1, requeue: bool = True) -> None:
        if signal_name not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {signal_name!r}; use a name such as 'SIGUSR1' or 'SIGUSR2'")
        super().__init__(signal.Signals[signal_name], check_every_n_steps)
        self.requeue = requeue
        self._previous_handler: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._installed or not SLURMEnvironment.detect():
            return
        self._previous_handler = self.install()
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            log.info("SLURM preemption: on %s every rank saves %s at the end of a step and the job is requeued",
                     self.signum.name, Path(trainer.default_root_dir) / "hpc_ckpt_N.ckpt")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous_handler)
            self._installed = False

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        return str(next_hpc_checkpoint(trainer.default_root_dir))

    def save(self, trainer: pl.Trainer) -> None:
        """Save ``hpc_ckpt_N.ckpt``, with SIGTERM's default action from here on: the requeue kills the job with
        SIGTERM, which must end it rather than ask for another checkpoint."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        super().save(trainer)

    def exit_status(self, trainer: pl.Trainer) -> int:
        """Requeue the job (global rank 0); 1 if that failed, else 0."""
        if not (self.requeue and trainer.is_global_zero):
            return 0
        job_id = slurm_job_id()
        return 0 if job_id is not None and requeue_job(job_id) else 1
