"""Guided generation from the command line: classifier-free and classifier-guided `predict` with the configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pl.callbacks import EMA
from diffusion_pl.cli import build_cli
from diffusion_pl.models.classifier import ClassifierModule
from helpers import REPO, tiny_args

GUIDANCE = REPO / "configs" / "guidance"
CFG = str(GUIDANCE / "cfg_fashion_mnist.yaml")
NOISY_CLASSIFIER = str(GUIDANCE / "classifier_fashion_mnist.yaml")
CLASSIFIER_GUIDED = str(GUIDANCE / "classifier_guided_fashion_mnist.yaml")
IMPROVED = str(REPO / "configs" / "ddpm" / "fashion_mnist_improved.yaml")  # the model the guided config samples

FIT = ["--trainer.max_steps=20", "--trainer.limit_val_batches=0", "--model.init_args.lr_scheduler.init_args.warmup_steps=0"]
PREDICT = ["--data.init_args.predict.num=6", "--data.init_args.predict.batch_size=3",
           "--model.init_args.sampler.steps=5"]


def classifier_guidance(checkpoint: Path, scale: float = 1.0) -> list[str]:
    """The command-line override that guides sampling with the noisy classifier of ``checkpoint``."""
    return [f"--model.init_args.guidance=[{{class_path: Classifier, init_args: {{checkpoint: '{checkpoint}', "
            f"scale: {scale}}}}}]"]


def fit(root: Path, config: str, *extra: str) -> Path:
    """Fit ``config`` (tiny) for a few steps without its EMA (so the checkpoint's weights have moved from their
    initialization); returns its last checkpoint."""
    cli = build_cli(tiny_args(root, *FIT, *extra, config=config), run=False)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, EMA)]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return next(root.rglob("last.ckpt"))


def predict(root: Path, config: str, ckpt: Path, *extra: str) -> dict[str, np.ndarray]:
    """``diffusion-pl predict`` of ``config`` from ``ckpt``; returns the arrays of the written samples.npz."""
    build_cli(["predict", *tiny_args(root, *PREDICT, *extra, "--ckpt_path", str(ckpt), config=config)])
    with np.load(next(root.rglob("samples.npz"))) as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def cfg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(tmp_path_factory.mktemp("cfg"), CFG)


def test_classifier_free_predict_targets_the_labels(tmp_path: Path, cfg_checkpoint: Path) -> None:
    guided = predict(tmp_path / "w3", CFG, cfg_checkpoint, "--data.init_args.predict.labels=[3]")
    assert guided["samples"].shape == (6, 8, 8, 1) and guided["labels"].tolist() == [3] * 6
    other_label = predict(tmp_path / "w3_y5", CFG, cfg_checkpoint, "--data.init_args.predict.labels=[5]")
    conditional = predict(tmp_path / "w0", CFG, cfg_checkpoint, "--data.init_args.predict.labels=[3]",
                          "--model.init_args.guidance.scale=0.0")
    # Same seeds: the label and the guidance weight are what change the images.
    assert not np.array_equal(guided["samples"], other_label["samples"])
    assert not np.array_equal(guided["samples"], conditional["samples"])


def test_classifier_guided_predict_uses_the_noisy_classifier(tmp_path: Path) -> None:
    classifier_ckpt = fit(tmp_path / "classifier", NOISY_CLASSIFIER)
    assert ClassifierModule.load_from_checkpoint(classifier_ckpt, map_location="cpu").net.time_conditional
    diffusion_ckpt = fit(tmp_path / "ddpm", IMPROVED)
    unguided = predict(tmp_path / "unguided", IMPROVED, diffusion_ckpt)
    assert "labels" not in unguided

    def guided(scale: float) -> dict[str, np.ndarray]:
        return predict(tmp_path / f"scale{scale}", CLASSIFIER_GUIDED, diffusion_ckpt,
                       *classifier_guidance(classifier_ckpt, scale), "--data.init_args.predict.labels=[2,7]")

    scale_zero, scale_ten = guided(0.0), guided(10.0)
    assert scale_ten["labels"].tolist() == [2, 7] * 3
    np.testing.assert_array_equal(scale_zero["samples"], unguided["samples"])
    assert not np.array_equal(scale_ten["samples"], unguided["samples"])
    model = build_cli(tiny_args(tmp_path / "rng", *classifier_guidance(classifier_ckpt), config=CLASSIFIER_GUIDED),
                      run=False).model
    state = torch.get_rng_state()
    model.example_batch(2)  # loads the guide
    assert model.guidance[0].net.time_conditional
    assert torch.equal(state, torch.get_rng_state())  # loading the guide draws nothing from the global RNG


def test_missing_classifier_checkpoint_says_how_to_train_it(tmp_path: Path) -> None:
    diffusion_ckpt = fit(tmp_path / "ddpm", IMPROVED)
    with pytest.raises(FileNotFoundError, match="classifier_fashion_mnist.yaml"):
        predict(tmp_path / "guided", CLASSIFIER_GUIDED, diffusion_ckpt,
                *classifier_guidance(tmp_path / "missing.ckpt"))


def test_classifier_of_another_process_is_refused(tmp_path: Path) -> None:
    """A noisy classifier trained on the linear schedule cannot guide the cosine-schedule model."""
    classifier_ckpt = fit(tmp_path / "classifier", NOISY_CLASSIFIER,
                          "--model.init_args.process.init_args.schedule=linear")
    diffusion_ckpt = fit(tmp_path / "ddpm", IMPROVED)
    with pytest.raises(ValueError, match="another forward process.*alpha"):
        predict(tmp_path / "guided", CLASSIFIER_GUIDED, diffusion_ckpt,
                *classifier_guidance(classifier_ckpt))
