"""The ``diffusion-pl-ema`` command: choose the EMA length after training (post-hoc EMA, EDM2 Sec. 3.2).

    diffusion-pl-ema --snapshots RUN/power_ema --sigma-rel 0.08 --output RUN/checkpoints/ema_0.080.ckpt
    diffusion-pl predict --config CONFIG --ckpt_path RUN/checkpoints/ema_0.080.ckpt

RUN is the log directory of a run trained with :class:`~diffusion_pl.callbacks.PowerEMA`
(``lightning_logs/version_N``). Bad input (no snapshots, a sigma_rel out of range, a damaged or foreign file) exits
with status 2 and one message; ``--debug`` (or ``DIFFUSION_PL_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion_pl.callbacks.ema_snapshots import FOLDER
from diffusion_pl.callbacks.posthoc_ema import write_posthoc_checkpoint
from diffusion_pl.callbacks.power_function import MAX_SIGMA_REL, sigma_rel_to_gamma
from diffusion_pl.cli.errors import DEBUG_ENV, DEBUG_FLAG, message
from diffusion_pl.core.errors import UserError

log = logging.getLogger(__name__)


def sigma_rel(text: str) -> float:
    """A sigma_rel argument: a number in (0, 0.2887)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        sigma_rel_to_gamma(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="diffusion-pl-ema", description="Reconstruct the power-function EMA of any sigma_rel from the snapshots "
        "of a run trained with PowerEMA (EDM2 post-hoc EMA) and write it as a checkpoint for predict/test.")
    command.add_argument("--snapshots", type=Path, required=True,
                         help=f"the run's snapshot folder (<log_dir>/{FOLDER})")
    command.add_argument("--sigma-rel", type=sigma_rel, required=True,
                         help=f"the EMA length to reconstruct, relative to the training time, in (0, {MAX_SIGMA_REL:.4f})"
                              " (EDM2 eq. 3)")
    command.add_argument("--output", type=Path, required=True, help="the checkpoint to write")
    command.add_argument("--checkpoint", type=Path, default=None,
                         help="a checkpoint of the run, whose weights are replaced (default: "
                              "<snapshots>/../checkpoints/last.ckpt)")
    command.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")
    return command


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point: writes the checkpoint, or exits with status 2 and one message."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = parser().parse_args(args)
    debug = options.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    checkpoint = options.checkpoint or options.snapshots.parent / "checkpoints" / "last.ckpt"
    try:
        reconstruction = write_posthoc_checkpoint(options.snapshots, options.sigma_rel, checkpoint, options.output)
    except UserError as error:
        if debug:
            raise
        sys.stderr.write(message(error))
        sys.exit(2)
    log.info("wrote %s: the power-function EMA of sigma_rel %g (gamma %.3f) at step %d from %d snapshot averages "
             "(weights and the rest of %s)", options.output, reconstruction.sigma_rel, reconstruction.gamma,
             reconstruction.step, len(reconstruction.coefficients), checkpoint)


if __name__ == "__main__":
    main()
