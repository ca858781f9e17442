"""One run, one directory: log versions claimed atomically, and a lock that keeps a second live run out.

Lightning picks ``version_N`` as one more than the highest it sees, so two runs started together with one
``default_root_dir`` both took ``version_0`` and wrote over each other's checkpoints, configs and event files.
:class:`RunDirectory` (installed by the CLI) claims the version by creating its folder exclusively, and writes a
lock file (``run.lock``: host, pid, start time, SLURM job, command) into the run's log directory and into every
explicit ModelCheckpoint ``dirpath``. A run that finds a live run's lock refuses to start; a lock of a process that
has ended (killed, crashed) is taken over, as is one of an earlier start of the same SLURM job (a requeued job
resumes in its ``version_<job id>`` on whatever node it gets).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_pl.callbacks.checkpoint_io import is_local_path
from diffusion_pl.callbacks.preemption import slurm_job_id
from diffusion_pl.core.errors import RunDirectoryInUseError, UserError
from diffusion_pl.core.owner import Owner

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
#: A lock file that cannot be read (being written, or damaged) counts as live for this long after its last change.
UNREADABLE_LOCK_GRACE_S = 60.0
_VERSION = re.compile(r"version_(\d+)")


def claim_version(root: str | Path) -> int:
    """Create and return the next free ``root/version_N``: ``mkdir`` fails if another run made it first, and the
    next number is tried, so concurrent runs get distinct versions."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def _create_exclusive(lock: Path, text: str) -> bool:
    """Create ``lock`` holding ``text`` unless it exists: written beside it, then hard-linked into place (readers
    never see a half-written lock); ``O_EXCL`` where the filesystem has no hard links."""
    temp = lock.with_name(f".{lock.name}.{os.getpid()}.{secrets.token_hex(4)}")
    temp.write_text(text)
    try:
        os.link(temp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(lock.read_text())
        Owner.from_dict(record)
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _takeover_reason(record: dict[str, Any], job_id: str | None) -> str | None:
    """Why a lock held by ``record`` may be taken over, or None if its run may still be live."""
    owner = Owner.from_dict(record)
    if owner.is_this_process:
        return "an earlier run of this process"
    alive = owner.alive()
    if alive is False:
        return f"pid {owner.pid} on {owner.host}, which is no longer running"
    if alive is None and job_id is not None and record.get("slurm_job_id") == job_id:
        return f"an earlier start of SLURM job {job_id} on {owner.host} (requeued)"
    return None


def _in_use_error(directory: Path, lock: Path, record: dict[str, Any]) -> RunDirectoryInUseError:
    owner = Owner.from_dict(record)
    command = record.get("command") or "?"
    command = command if len(command) <= 160 else command[:157] + "..."
    where = ("" if owner.on_this_host else
             f" If it is no longer running (killed on {owner.host}?), delete {lock} and start again.")
    return RunDirectoryInUseError(
        f"{directory} is in use by another run: pid {owner.pid} on {owner.host}, started {record.get('started', '?')}"
        f" ({command}).\nTwo runs writing one directory overwrite each other's checkpoints and logs: give this run "
        "its own directory (another --trainer.default_root_dir, or leave the logger's version unset so that the run "
        f"takes a new version_N), or wait until that run ends.{where}")


def acquire_lock(directory: str | Path, job_id: str | None = None) -> Path:
    """Write ``directory/run.lock`` for this process, taking over a stale lock.

    Raises:
        RunDirectoryInUseError: A live run (or one on another host, whose liveness is unknown) holds the lock.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    record = {**Owner.current().as_dict(), "slurm_job_id": job_id, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    for _ in range(10):
        if _create_exclusive(lock, json.dumps(record)):
            return lock
        holder = _read_lock(lock)
        if holder is None:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - lock.stat().st_mtime < UNREADABLE_LOCK_GRACE_S:
                    time.sleep(0.2)  # being written by a filesystem without hard links
                    continue
                log.warning("removing the unreadable lock file %s", lock)
                lock.unlink()
            continue
        reason = _takeover_reason(holder, job_id)
        if reason is None:
            raise _in_use_error(directory, lock, holder)
        log.log(logging.DEBUG if holder.get("pid") == os.getpid() else logging.WARNING,
                "taking over the lock %s of %s", lock, reason)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    raise RunDirectoryInUseError(f"could not lock {directory}: {lock} keeps changing (another run starting there?); "
                                 "give this run its own directory")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process still holds it."""
    record = _read_lock(lock)
    if record is not None and Owner.from_dict(record).is_this_process:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


class RunDirectory(pl.Callback):
    """Claim a fresh log version atomically and lock the run's directories (global rank 0; the others follow).

    Loggers with an unset version (TensorBoard, CSV) get the next ``version_N`` that this run created itself; a fixed
    version (SLURM's job id, an explicit one) is kept. The run's log directory and every explicit ModelCheckpoint
    ``dirpath`` outside it get a ``run.lock``, removed when the run ends. It runs before every other callback.
    """

    def __init__(self) -> None:
        self._locks: list[Path] = []
        self._claimed: list[Path] = []
        self._unset: list[Any] = []

    def note_unset_versions(self, trainer: pl.Trainer) -> None:
        """Make the loggers whose version is unset claim it when it is first asked for. Lightning resolves a version
        (as the next free number, not atomically) and creates the TensorBoard writer there before any callback's
        ``setup``; from here on that resolution claims the folder (global rank 0; the CLI calls this as soon as the
        Trainer exists, :meth:`setup` otherwise)."""
        self._unset = [logger for logger in trainer.loggers
                       if getattr(logger, "_version", 0) is None and is_local_path(logger.root_dir)]
        for logger in self._unset:
            logger._get_next_version = functools.partial(self._claim, trainer, logger, logger._get_next_version)

    def _claim(self, trainer: pl.Trainer, logger: Any, unclaimed: Callable[[], int]) -> int:
        """On global rank 0 claim the logger's next version folder; elsewhere Lightning's own guess (rank 0's
        version is broadcast in :meth:`setup`)."""
        if not trainer.is_global_zero:
            return unclaimed()
        version = claim_version(logger.root_dir)
        self._claimed.append(Path(logger.root_dir) / f"version_{version}")
        return version

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Rank 0 claims the versions and writes the locks; every rank learns the versions, or the refusal."""
        if not self._unset:
            self.note_unset_versions(trainer)
        versions, error = None, None
        if trainer.is_global_zero:
            try:
                versions = [logger.version for logger in self._unset]  # claimed when first resolved
            except OSError as failure:
                error = f"cannot create the run's version folder: {failure}"
        versions, error = trainer.strategy.broadcast((versions, error))
        if error is not None:
            raise UserError(error)
        for logger, version in zip(self._unset, versions):
            logger._version = version
        directories = self._directories(trainer)
        if trainer.is_global_zero:
            error = self._lock(directories)
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise RunDirectoryInUseError(error)

    def _lock(self, directories: list[Path]) -> str | None:
        """Lock every directory (rank 0); the refusal's message, or None."""
        job_id = slurm_job_id()
        try:
            for directory in directories:
                self._locks.append(acquire_lock(directory, job_id))
        except RunDirectoryInUseError as refused:
            self._release()
            return str(refused)
        except OSError as failure:
            self._release()
            return f"cannot write the run lock in {directory}: {failure}; give this run a writable directory"
        return None

    def _directories(self, trainer: pl.Trainer) -> list[Path]:
        """The run's log directory and the explicit checkpoint directories outside it (every rank calls this:
        ``trainer.log_dir`` broadcasts)."""
        log_dir = Path(trainer.log_dir or trainer.default_root_dir).resolve()
        found = [log_dir]
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and is_local_path(callback.dirpath):
                dirpath = Path(callback.dirpath).resolve()
                if not any(_inside(dirpath, d) for d in found):
                    found.append(dirpath)
        return found

    def _release(self, refused: bool = False) -> None:
        """Remove this run's locks, and the version folders it claimed if nothing was written there (``refused``: a
        run that failed before its first step, whose folder holds only what every run writes when it starts)."""
        for lock in self._locks:
            release_lock(lock)
        self._locks = []
        for folder in self._claimed:
            with contextlib.suppress(OSError):
                if refused and _holds_only_start_files(folder):
                    shutil.rmtree(folder)
                folder.rmdir()  # only if empty: a run that stopped before writing anything leaves no trace
        self._claimed = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(refused=trainer.global_step == 0)


#: What a run writes into its version folder when it starts, before any result: a refused run leaves only these.
_START_FILES = ("config.yaml", "hparams.yaml", LOCK_NAME)


def _holds_only_start_files(folder: Path) -> bool:
    """Whether ``folder`` holds no checkpoint, grid or prediction: only start files, event files and empty folders."""
    return all((path.is_file() and (path.name in _START_FILES or path.name.startswith("events.out.tfevents.")))
               or (path.is_dir() and not any(path.iterdir())) for path in folder.iterdir())
