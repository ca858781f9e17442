"""The ``diffusion-pl-eval`` command: score samples (``samples.npz`` from ``diffusion-pl predict``, or a folder of
images) against real images, print a table and write the scores as JSON.

    diffusion-pl-eval runs/.../predictions/samples.npz --reference FashionMNIST:test \\
        --domain CLASSIFIER.ckpt --floor --kid --precision-recall --on-target CLASSIFIER.ckpt
    diffusion-pl-eval samples.npz --reference cifar10:train --inception --inception-weights pt_inception.pth \\
        --inception-score --save-reference cifar10_train.npz      # later: --reference cifar10_train.npz

Every metric is opt-in; the computation is :func:`diffusion_pl.metrics.evaluation.evaluate`. FID grows as the number
of samples falls (Chong & Forsyth 2020): compare numbers only at equal N, and read a small-N FID (the FID callback's
in-training value) beside its ``--floor``, not beside published 50k numbers. Bad input exits with status 2 and one
message that says what to fix (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from diffusion_pl.cli.errors import DEBUG_FLAG, user_errors_exit
from diffusion_pl.core.checkpoint_file import write_atomically
from diffusion_pl.metrics.evaluation import Evaluation, Request, evaluate

log = logging.getLogger(__name__)


def _classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(value) for value in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, got {text!r}") from error


def parser() -> argparse.ArgumentParser:
    """The command's arguments (each metric behind its own flag)."""
    p = argparse.ArgumentParser(prog="diffusion-pl-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="samples.npz (samples uint8 N x H x W x C, labels, prompts) or a folder of images")
    real = p.add_argument_group("real images")
    real.add_argument("--reference", help="SOURCE[:SPLIT]: a data source part (FashionMNIST, "
                      "diffusion_pl.data.FashionMNIST:train, or a YAML spec with init_args; default split test), an "
                      "image folder, or a statistics .npz")
    real.add_argument("--resize-mode", choices=("pad", "resize"), default="pad",
                      help="how real images are brought to the samples' size, as in the data config")
    real.add_argument("--held-out", help="real images for --floor, as --reference (default: its other split)")
    real.add_argument("--save-reference", metavar="FILE.npz", help="write the reference statistics (computed once)")
    real.add_argument("--keep", type=int, default=10000, help="real features kept for KID and precision/recall")
    metrics = p.add_argument_group("metrics (opt-in)")
    metrics.add_argument("--inception", action="store_true", help="FID in the FID Inception-v3's features")
    metrics.add_argument("--inception-weights", metavar="FILE",
                         help="local Inception weights (pt_inception-2015-12-05-6726825d.pth); default: download")
    metrics.add_argument("--domain", metavar="CLASSIFIER.ckpt", help="FID in a framework-trained classifier's features")
    metrics.add_argument("--floor", action="store_true", help="FID of as many held-out real images (the floor)")
    metrics.add_argument("--kid", action="store_true", help="Kernel Inception Distance in each feature space")
    metrics.add_argument("--precision-recall", action="store_true", help="k-NN precision and recall (k = --k)")
    metrics.add_argument("--inception-score", action="store_true", help="Inception Score (with --inception)")
    metrics.add_argument("--on-target", metavar="CLASSIFIER.ckpt", help="share of samples in their target class")
    metrics.add_argument("--labels", type=_classes, help="target classes cycled, for an .npz without labels")
    metrics.add_argument("--clip", metavar="CLIP", help="CLIP score of samples with prompts (a CLIPModule checkpoint, "
                                                        "a clip file or a released model name)")
    settings = p.add_argument_group("settings")
    settings.add_argument("--json", metavar="FILE", help="where the scores go (default: <samples>.scores.json)")
    settings.add_argument("--batch-size", type=int, default=250)
    settings.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    settings.add_argument("--seed", type=int, default=0, help="seed of the random subsets")
    settings.add_argument("--kid-subsets", type=int, default=100)
    settings.add_argument("--kid-subset-size", type=int, default=1000)
    settings.add_argument("--is-splits", type=int, default=10)
    settings.add_argument("--k", type=int, default=3, help="precision/recall's k-th neighbour")
    settings.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")
    return p


def request_of(args: argparse.Namespace) -> Request:
    """The :class:`Request` the parsed arguments describe."""
    fields = {name: value for name, value in vars(args).items() if name not in ("json", "debug")}
    return Request(**fields)


def table(evaluation: Evaluation) -> str:
    """The scores as a Markdown table, one metric a row."""
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {name} | {value:.6g} |" for name, value in evaluation.metrics.items()]
    per_class = evaluation.details.get("on_target_per_class", {})
    rows += [f"| on_target class {label} | {value:.4g} |" for label, value in per_class.items()]
    return "\n".join(rows) + "\n"


def json_path(samples: str, given: str | None) -> Path:
    """``given``, else ``<samples without suffix>.scores.json`` beside the samples."""
    if given:
        return Path(given)
    path = Path(samples.rstrip("/\\"))
    return path.with_name(path.stem + ".scores.json")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: the table on stdout, the JSON file; bad input exits with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    with user_errors_exit(args.debug):
        evaluation = evaluate(request_of(args))
        path = json_path(args.samples, args.json)
        report = {"metrics": evaluation.metrics, "details": evaluation.details, "settings": evaluation.settings}
        write_atomically(path, [(json.dumps(report, indent=2) + "\n").encode()], what="scores")
    sys.stdout.write(table(evaluation))
    log.info("scores written to %s", path)


if __name__ == "__main__":  # python -m diffusion_pl.cli.evaluate, where the console script is not installed
    main()
