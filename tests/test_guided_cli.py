"""Guided generation from the command line: classifier-free and classifier-guided `predict` with the configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pl.callbacks import EMA
from diffusion_pl.models.classifier import ClassifierModule
from helpers import REPO, last_checkpoint, predict_samples, run_cli, run_trainer

GUIDANCE = REPO / "configs" / "guidance"
CFG = str(GUIDANCE / "cfg_fashion_mnist.yaml")
NOISY_CLASSIFIER = str(GUIDANCE / "classifier_fashion_mnist.yaml")
CLASSIFIER_GUIDED = str(GUIDANCE / "classifier_guided_fashion_mnist.yaml")
IMPROVED = str(REPO / "configs" / "ddpm" / "fashion_mnist_improved.yaml")  # the model the guided config samples

# Fits run without the EMA (remove=(EMA,)), so that the checkpoint's weights have moved from their initialisation.
FIT = ["--trainer.max_steps=20", "--trainer.limit_val_batches=0", "--model.init_args.lr_scheduler.init_args.warmup_steps=0"]
PREDICT = ["--data.init_args.predict.num=6", "--data.init_args.predict.batch_size=3",
           "--model.init_args.sampler.steps=5"]


def classifier_guidance(checkpoint: Path, scale: float = 1.0) -> list[str]:
    """The command-line override that guides sampling with the noisy classifier of ``checkpoint``."""
    return [f"--model.init_args.guidance=[{{class_path: Classifier, init_args: {{checkpoint: '{checkpoint}', "
            f"scale: {scale}}}}}]"]


@pytest.fixture(scope="module")
def cfg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cfg")
    run_trainer("fit", CFG, *FIT, root=root, remove=(EMA,))
    return last_checkpoint(root)


def test_classifier_free_predict_targets_the_labels(tmp_path: Path, cfg_checkpoint: Path) -> None:
    guided = predict_samples(CFG, *PREDICT, "--data.init_args.predict.labels=[3]", root=tmp_path / "w3",
                             ckpt_path=cfg_checkpoint)
    assert guided["samples"].shape == (6, 8, 8, 1) and guided["labels"].tolist() == [3] * 6
    other_label = predict_samples(CFG, *PREDICT, "--data.init_args.predict.labels=[5]", root=tmp_path / "w3_y5",
                                  ckpt_path=cfg_checkpoint)
    conditional = predict_samples(CFG, *PREDICT, "--data.init_args.predict.labels=[3]",
                                  "--model.init_args.guidance.scale=0.0", root=tmp_path / "w0",
                                  ckpt_path=cfg_checkpoint)
    # Same seeds: the label and the guidance weight are what change the images.
    assert not np.array_equal(guided["samples"], other_label["samples"])
    assert not np.array_equal(guided["samples"], conditional["samples"])


def test_classifier_guided_predict_uses_the_noisy_classifier(tmp_path: Path) -> None:
    run_trainer("fit", NOISY_CLASSIFIER, *FIT, root=tmp_path / "classifier", remove=(EMA,))
    classifier_ckpt = last_checkpoint(tmp_path / "classifier")
    assert ClassifierModule.load_from_checkpoint(classifier_ckpt, map_location="cpu").net.time_conditional
    run_trainer("fit", IMPROVED, *FIT, root=tmp_path / "ddpm", remove=(EMA,))
    diffusion_ckpt = last_checkpoint(tmp_path / "ddpm")
    unguided = predict_samples(IMPROVED, *PREDICT, root=tmp_path / "unguided", ckpt_path=diffusion_ckpt)
    assert "labels" not in unguided

    def guided(scale: float) -> dict[str, np.ndarray]:
        return predict_samples(CLASSIFIER_GUIDED, *PREDICT, *classifier_guidance(classifier_ckpt, scale),
                               "--data.init_args.predict.labels=[2,7]", root=tmp_path / f"scale{scale}",
                               ckpt_path=diffusion_ckpt)

    scale_zero, scale_ten = guided(0.0), guided(10.0)
    assert scale_ten["labels"].tolist() == [2, 7] * 3
    np.testing.assert_array_equal(scale_zero["samples"], unguided["samples"])
    assert not np.array_equal(scale_ten["samples"], unguided["samples"])
    model = run_cli(None, CLASSIFIER_GUIDED, *classifier_guidance(classifier_ckpt), root=tmp_path / "rng").model
    state = torch.get_rng_state()
    model.example_batch(2)  # loads the guide
    assert model.guidance[0].net.time_conditional
    assert torch.equal(state, torch.get_rng_state())  # loading the guide draws nothing from the global RNG


def test_missing_classifier_checkpoint_says_how_to_train_it(tmp_path: Path) -> None:
    run_trainer("fit", IMPROVED, *FIT, root=tmp_path / "ddpm", remove=(EMA,))
    with pytest.raises(FileNotFoundError, match="classifier_fashion_mnist.yaml"):
        run_cli("predict", CLASSIFIER_GUIDED, *PREDICT, *classifier_guidance(tmp_path / "missing.ckpt"),
                root=tmp_path / "guided", ckpt_path=last_checkpoint(tmp_path / "ddpm"))


def test_classifier_of_another_process_is_refused(tmp_path: Path) -> None:
    """A noisy classifier trained on the linear schedule cannot guide the cosine-schedule model."""
    run_trainer("fit", NOISY_CLASSIFIER, *FIT, "--model.init_args.process.init_args.schedule=linear",
                root=tmp_path / "classifier", remove=(EMA,))
    run_trainer("fit", IMPROVED, *FIT, root=tmp_path / "ddpm", remove=(EMA,))
    with pytest.raises(ValueError, match="another forward process.*alpha"):
        run_cli("predict", CLASSIFIER_GUIDED, *PREDICT, *classifier_guidance(last_checkpoint(tmp_path / "classifier")),
                root=tmp_path / "guided", ckpt_path=last_checkpoint(tmp_path / "ddpm"))
