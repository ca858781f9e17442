"""Post-hoc EMA (EDM2 Sec. 3.2, App. C.3): the average of any sigma_rel, reconstructed after training from the
snapshots that :class:`~diffusion_pl.callbacks.PowerEMA` wrote, and written as a checkpoint that ``predict``/``test``
load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.callbacks.ema_snapshots import read_snapshot, snapshot_files
from diffusion_pl.callbacks.power_function import PowerAverage, posthoc_coefficients, sigma_rel_to_gamma
from diffusion_pl.core.checkpoint_file import non_finite_weights, write_checkpoint
from diffusion_pl.core.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    NonFiniteError,
    UserError,
)
from diffusion_pl.nets.loading import load_checkpoint

log = logging.getLogger(__name__)

#: What a checkpoint holds to resume training: a reconstruction is not a point of training to resume from.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks", "loops", "current_model_state", "averaging_state")
#: Where the output checkpoint records how it was made.
RECORD_KEY = "posthoc_ema"


@dataclass
class Reconstruction:
    """A reconstructed average: its sigma_rel, gamma and step, its weights, and the (step, sigma_rel, coefficient) of
    every snapshot average it combines."""

    sigma_rel: float
    gamma: float
    step: int
    weights: dict[str, Tensor]
    coefficients: list[tuple[int, float, float]]


def read_snapshots(directory: str | Path) -> list[tuple[int, PowerAverage]]:
    """Every average of every snapshot in ``directory`` as (step, average), in step order (weights memory-mapped).

    Raises:
        CheckpointNotFoundError: No snapshot there.
    """
    files = snapshot_files(directory)
    if not files:
        raise CheckpointNotFoundError(f"no power-EMA snapshots (step_XXXXXXX.pt) in {directory}: pass the power_ema "
                                      "folder of a run trained with PowerEMA (overlays/power_ema.yaml)")
    found = []
    for step in sorted(files):
        stored_step, averages = read_snapshot(files[step])
        found.extend((stored_step, average) for average in averages)
    return found


def reconstruct(snapshots: Sequence[tuple[int, PowerAverage]], sigma_rel: float) -> Reconstruction:
    """The power-function average of ``sigma_rel`` at the last snapshot's step: the combination of the snapshot
    averages whose profile is closest to it in L2 (EDM2 App. C.3), summed in float64.

    Raises:
        ConfigError: ``sigma_rel`` outside (0, 0.2887).
        CheckpointMismatchError: Snapshots of different weights (another model).
    """
    try:
        gamma = sigma_rel_to_gamma(sigma_rel)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    step = max(s for s, _ in snapshots)
    x = posthoc_coefficients([s for s, _ in snapshots], [a.gamma for _, a in snapshots], step, gamma)
    first = snapshots[0][1].weights
    total = {name: torch.zeros(tensor.shape, dtype=torch.float64) for name, tensor in first.items()}
    for (at, average), coefficient in zip(snapshots, x.tolist()):
        if {n: t.shape for n, t in average.weights.items()} != {n: t.shape for n, t in first.items()}:
            raise CheckpointMismatchError(f"the snapshot of step {at} holds other weights than that of step "
                                          f"{snapshots[0][0]}: snapshots of two models are in one folder")
        for name, tensor in average.weights.items():
            total[name].add_(tensor.to(device="cpu", dtype=torch.float64), alpha=coefficient)
    weights = {name: tensor.to(first[name].dtype) for name, tensor in total.items()}
    return Reconstruction(sigma_rel, gamma, step, weights,
                          [(s, a.sigma_rel, c) for (s, a), c in zip(snapshots, x.tolist())])


def with_weights(checkpoint: dict[str, Any], reconstruction: Reconstruction, source: str) -> dict[str, Any]:
    """``checkpoint`` (of the run that wrote the snapshots) with the reconstructed weights in its ``state_dict`` and
    without its training state, plus a record of the reconstruction.

    Raises:
        CheckpointMismatchError: The snapshots hold weights that the checkpoint does not, or of other shapes.
        NonFiniteError: The reconstruction has NaN or infinite weights.
    """
    state = dict(checkpoint["state_dict"])
    wrong = [name for name, tensor in reconstruction.weights.items()
             if name not in state or state[name].shape != tensor.shape]
    if wrong:
        raise CheckpointMismatchError(f"{source} is not a checkpoint of the run that wrote the snapshots: it lacks or "
                                      f"shapes differently {len(wrong)} of their weights ({', '.join(wrong[:3])})")
    state.update(reconstruction.weights)
    out = {key: value for key, value in checkpoint.items() if key not in TRAINING_STATE}
    out["state_dict"] = state
    found = non_finite_weights(out)
    if found is not None:
        raise NonFiniteError(f"the reconstructed average has non-finite weights ({found}): the snapshots are of a "
                             "diverged run")
    out[RECORD_KEY] = {"sigma_rel": reconstruction.sigma_rel, "gamma": reconstruction.gamma,
                       "step": reconstruction.step, "coefficients": reconstruction.coefficients}
    return out


def write_posthoc_checkpoint(snapshots: str | Path, sigma_rel: float, checkpoint: str | Path,
                             output: str | Path) -> Reconstruction:
    """Reconstruct the average of ``sigma_rel`` from the snapshot folder ``snapshots`` and write it to ``output`` as
    ``checkpoint`` with those weights (atomic, checksummed).

    Raises:
        UserError: ``output`` is ``checkpoint`` (the run's training state would be lost).
    """
    if Path(output).resolve() == Path(checkpoint).resolve():
        raise UserError(f"--output {output} is the run's checkpoint: writing the reconstruction there would drop its "
                        "training state; choose another file")
    reconstruction = reconstruct(read_snapshots(snapshots), sigma_rel)
    base = load_checkpoint(checkpoint, what="checkpoint of the run")
    if base.get("global_step") != reconstruction.step:
        log.info("%s is of step %s; the reconstructed average is of step %d (its weights replace the checkpoint's)",
                 checkpoint, base.get("global_step"), reconstruction.step)
    write_checkpoint(with_weights(base, reconstruction, str(checkpoint)), output)
    return reconstruction
