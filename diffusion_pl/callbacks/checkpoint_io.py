"""Lightning's checkpoint I/O through :mod:`diffusion_pl.core.checkpoint_file`: atomic, checksummed, verified on load.

The CLI installs :class:`VerifiedCheckpointIO` in every Trainer (unless the config gives another ``CheckpointIO``
plugin), so every save (ModelCheckpoint, ``last.ckpt``, SLURM preemption checkpoints, ``trainer.save_checkpoint``)
and every load of the Trainer (``--ckpt_path``, ``last``, ``hpc``) goes through it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from diffusion_pl.core.checkpoint_file import (
    read_checkpoint,
    remove_stale_temp_files,
    write_checkpoint,
)


def is_local_path(path: _PATH) -> bool:
    """Whether ``path`` is on the local filesystem (not ``s3://``, ``gs://``, ...)."""
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the checkpoint's own directory, fsyncs and renames it (a kill never leaves a
    partial ``last.ckpt`` nor removes the previous one, wherever ``$TMPDIR`` is), with a SHA-256 in the file;
    loads verify it and refuse a changed or truncated file, naming the checkpoints to resume from instead, and
    remove the temporary files that killed writers left beside it (a run resumed into a new version no longer saves
    there, so nothing else would). Remote paths (``s3://`` ...) are left to Lightning's own I/O."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not is_local_path(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        checkpoint = read_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)
        remove_stale_temp_files(Path(path).parent)
        return checkpoint
