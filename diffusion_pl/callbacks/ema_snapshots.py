"""Snapshot files of power-function averages (EDM2 Sec. 3.2): what post-hoc EMA reconstructs any profile from.

``<run directory>/power_ema/step_XXXXXXX.pt`` holds every average that :class:`~diffusion_pl.callbacks.PowerEMA`
tracks after that optimizer step (its sigma_rel, gamma and trainable weights), written like a checkpoint (atomic, with
its SHA-256; :mod:`diffusion_pl.core.checkpoint_file`) and read back verified, memory-mapped.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from diffusion_pl.callbacks.power_function import PowerAverage
from diffusion_pl.core.checkpoint_file import read_checkpoint, write_atomically, write_checkpoint
from diffusion_pl.core.errors import CheckpointError

log = logging.getLogger(__name__)

#: The folder of a run's snapshots, in its log directory.
FOLDER = "power_ema"
#: What a snapshot file records about itself.
KIND = "diffusion_pl power-function EMA snapshot"
_NAME = re.compile(r"step_(\d+)\.pt")
_CHUNK = 16 << 20


def snapshot_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:07d}.pt"


def snapshot_files(directory: str | Path) -> dict[int, Path]:
    """The snapshot files of ``directory`` by step (none if it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): path for path in directory.iterdir() if (m := _NAME.fullmatch(path.name))}


def write_snapshot(directory: str | Path, step: int, averages: list[PowerAverage]) -> Path:
    """Write the averages after optimizer step ``step`` (atomic, checksummed); returns the file."""
    path = snapshot_path(directory, step)
    write_checkpoint({"kind": KIND, "step": step, "averages": [
        {"sigma_rel": a.sigma_rel, "gamma": a.gamma, "weights": a.weights} for a in averages]}, path)
    return path


def read_snapshot(path: str | Path) -> tuple[int, list[PowerAverage]]:
    """The step and averages of a snapshot file, verified (checksum) and memory-mapped: weights are read from disk
    when used.

    Raises:
        CheckpointCorruptError: The file changed after it was written.
        CheckpointError: Not a snapshot file.
    """
    content: Any = read_checkpoint(path, mmap=True)
    if not isinstance(content, dict) or content.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a power-function EMA snapshot (written by PowerEMA)")
    return content["step"], [PowerAverage(a["sigma_rel"], a["gamma"], a["weights"]) for a in content["averages"]]


def continue_history(previous: Path | None, directory: Path, step: int) -> None:
    """Make ``directory`` hold the snapshots of a run resumed at ``step``: those of the interrupted run (its folder
    ``previous``) up to ``step``, hard-linked or copied; none after it (a crashed run's snapshots past its last
    checkpoint are of weights the resumed run trains anew)."""
    for later, path in snapshot_files(directory).items():
        if later > step:
            path.unlink()
            log.info("removed snapshot %s: it is later than the resumed step %d", path, step)
    if previous is None or previous.resolve() == directory.resolve():
        return
    earlier = {s: path for s, path in snapshot_files(previous).items() if s <= step}
    if not earlier:
        log.warning("no power-EMA snapshots of steps up to %d in %s: post-hoc EMA of this run sees only the "
                    "snapshots written from now on", step, previous)
        return
    directory.mkdir(parents=True, exist_ok=True)
    for s, source in earlier.items():
        target = snapshot_path(directory, s)
        if not target.exists():
            _link_or_copy(source, target)
    log.info("carried %d power-EMA snapshots (steps %d-%d) over from %s", len(earlier), min(earlier), max(earlier),
             previous)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``, else copy it there atomically."""
    try:
        os.link(source, target)
    except OSError:
        with open(source, "rb") as handle:
            write_atomically(target, iter(lambda: handle.read(_CHUNK), b""), what="power-EMA snapshot")
