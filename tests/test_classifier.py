"""The encoder classifier, ClassifierModule (clean and noisy x_t), its config and checkpoints."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import REPO, run_cli

from diffusion_pl.data import Digits, ImageData, ImageDataModule, ImageFormat
from diffusion_pl.metrics import ClassifierFeatures
from diffusion_pl.models import WarmupLR
from diffusion_pl.models.classifier import ClassifierModule
from diffusion_pl.nets.classifier import EncoderClassifier, load_classifier_net
from diffusion_pl.processes import DiscreteProcess

CLASSIFIER_CONFIG = str(REPO / "configs" / "classifier" / "fashion_mnist.yaml")
DIGITS_8 = ImageFormat(image_size=8, channels=1, resize_mode="resize")


def digits_data(batch_size: int = 64) -> ImageDataModule:
    return ImageDataModule(Digits(), DIGITS_8, batch_size=batch_size, val_fraction=0.1)


def digits_classifier(process: DiscreteProcess | None = None, time_conditional: bool = False) -> ClassifierModule:
    net = EncoderClassifier(image_size=8, in_channels=1, num_classes=10, base_channels=16, channel_mult=(1, 2),
                            num_res_blocks=1, attention_resolutions=(4,), time_conditional=time_conditional)
    return ClassifierModule(net, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), process=process,
                            image_size=8, channels=1, lr_scheduler=functools.partial(WarmupLR, decay="cosine"))


def quiet_trainer(root: Path, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, logger=False, **kwargs)


def train_digits_classifier(root: Path, max_steps: int = 150) -> tuple[Path, pl.Trainer, ClassifierModule]:
    """Fit a small clean classifier on the 8x8 digits and save its checkpoint as ``root/classifier.ckpt``."""
    pl.seed_everything(0)
    module, data = digits_classifier(), digits_data()
    trainer = quiet_trainer(root, max_steps=max_steps, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = root / "classifier.ckpt"
    trainer.save_checkpoint(path)
    return path, trainer, module


def test_net_shapes_features_and_time() -> None:
    net = EncoderClassifier(image_size=16, in_channels=3, num_classes=5, base_channels=8, channel_mult=(1, 2, 4),
                            num_res_blocks=1, attention_resolutions=(8,))
    x = torch.randn(4, 3, 16, 16)
    assert net(x).shape == (4, 5) and net.features(x).shape == (4, 32) == (4, net.num_features)
    with pytest.raises(ValueError, match="time_conditional=True"):
        net(x, torch.zeros(4))
    with pytest.raises(ValueError, match="image_size"):
        net(torch.randn(4, 3, 8, 8))
    timed = EncoderClassifier(image_size=16, in_channels=3, num_classes=5, base_channels=8, channel_mult=(1, 2),
                              num_res_blocks=1, attention_resolutions=(), time_conditional=True).eval()
    for p in timed.parameters():  # residual branches start at zero; give them weights so t matters
        torch.nn.init.normal_(p, std=0.2)
    torch.testing.assert_close(timed(x), timed(x, torch.zeros(4)))  # t=None means clean, t = 0
    assert not torch.allclose(timed(x, torch.full((4,), 500.0)), timed(x))


def test_module_logs_accuracy_per_noise_level(tmp_path: Path) -> None:
    """Noisy training: t ~ process.sample_t; accuracy per noise bucket at validation and test."""
    pl.seed_everything(0)
    module = digits_classifier(DiscreteProcess(100, "cosine"), time_conditional=True)
    trainer = quiet_trainer(tmp_path, max_steps=3, val_check_interval=3, limit_val_batches=2, limit_test_batches=2,
                            log_every_n_steps=1)
    trainer.fit(module, datamodule=digits_data())
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    buckets = [k for k in metrics if k.startswith("val/acc_noise_")]
    assert buckets and all(0.0 <= float(metrics[k]) <= 1.0 for k in buckets)
    results = trainer.test(module, datamodule=digits_data(), verbose=False)[0]
    assert "test/acc" in results and any(k.startswith("test/acc_noise_") for k in results)
    path = tmp_path / "noisy.ckpt"  # the checkpoint records the process, for guided samplers to check
    trainer.save_checkpoint(path)
    restored = ClassifierModule.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(restored.process, DiscreteProcess)  # the checkpoint describes its process, and keeps its marginals
    for name, value in DiscreteProcess(100, "cosine").marginals().items():
        torch.testing.assert_close(restored.process_marginals[name], value)
        torch.testing.assert_close(restored.process.marginals()[name], value)


def test_evaluation_noise_leaves_global_rng_alone(tmp_path: Path) -> None:
    module = digits_classifier(DiscreteProcess(100, "cosine"), time_conditional=True)
    data = digits_data()
    trainer = quiet_trainer(tmp_path, limit_val_batches=2)
    state = torch.get_rng_state()
    first = trainer.validate(module, datamodule=data, verbose=False)[0]
    second = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert first == second
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.slow
def test_short_training_on_digits_reaches_high_accuracy(tmp_path: Path) -> None:
    path, trainer, module = train_digits_classifier(tmp_path, max_steps=150)
    accuracy = trainer.test(module, datamodule=digits_data(), verbose=False)[0]["test/acc"]
    assert accuracy >= 0.9
    net = load_classifier_net(path)
    images = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(net(images), module.net.eval()(images))
    check_sample_accuracy_tool(path, tmp_path)


def check_sample_accuracy_tool(classifier: Path, root: Path) -> None:
    """tools/sample_accuracy.py scores real test digits: high against their labels, low against shifted ones."""
    test = Digits().load("test", DIGITS_8)
    samples = test.images.permute(0, 2, 3, 1).numpy()
    np.savez(root / "true.npz", samples=samples, labels=test.labels.numpy())
    np.savez(root / "shifted.npz", samples=samples, labels=(test.labels.numpy() + 1) % 10)
    np.savez(root / "unlabelled.npz", samples=samples[:10])
    tool = [sys.executable, str(REPO / "tools" / "sample_accuracy.py"), "--classifier", str(classifier)]
    result = subprocess.run([*tool, str(root / "true.npz"), str(root / "shifted.npz")], capture_output=True,
                            text=True, check=True)
    rows = [line.split("|") for line in result.stdout.splitlines()[2:]]
    true_accuracy, shifted_accuracy = float(rows[0][3]), float(rows[1][3])
    assert true_accuracy >= 0.9 and shifted_accuracy <= 0.05
    scored = subprocess.run([*tool, "--labels", ",".join(map(str, test.labels[:10].tolist())), str(root / "unlabelled.npz")],
                            capture_output=True, text=True, check=True)
    assert float(scored.stdout.splitlines()[2].split("|")[3]) >= 0.7
    failed = subprocess.run([*tool, str(root / "unlabelled.npz")], capture_output=True, text=True)
    assert failed.returncode != 0 and "pass --labels" in failed.stderr
    check_per_class_fid(tool, classifier, root, test)


def check_per_class_fid(tool: list[str], classifier: Path, root: Path, test: ImageData) -> None:
    """--fid-source against closed forms: the real test digits scored against the test split itself give FID 0 in
    every class; copies of one digit x_c per class give ||mu_c - f(x_c)||^2 + tr(Sigma_c), with mu_c, Sigma_c the
    (unbiased) feature moments of the class's real images; the floor row scores real train digits."""
    labels = test.labels.numpy()
    first_of_class = {int(c): int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)}
    collapsed = test.images[[first_of_class[int(c)] for c in labels]].permute(0, 2, 3, 1).numpy()
    np.savez(root / "collapsed.npz", samples=collapsed, labels=labels)
    result = subprocess.run([*tool, "--fid-source", "diffusion_pl.data.Digits", "--fid-split", "test",
                             "--resize-mode", "resize", str(root / "true.npz"), str(root / "collapsed.npz")],
                            capture_output=True, text=True, check=True)
    rows = [line.split("|") for line in result.stdout.splitlines()[2:]]
    true_fid, collapsed_fid, floor = (np.array([float(v.split(":")[1]) for v in row[5].split()]) for row in rows)
    features = ClassifierFeatures(str(classifier))(test.images.float() / 127.5 - 1.0).features.double().numpy()
    expected = []
    for c, index in first_of_class.items():
        own = features[labels == c]
        expected.append(((own.mean(0) - features[index]) ** 2).sum() + np.trace(np.cov(own, rowvar=False)))
    assert min(expected) > 1e-3  # features vary within each class: the closed form is not trivially 0
    np.testing.assert_allclose(true_fid, 0.0, atol=1e-3 * min(expected))
    np.testing.assert_allclose(collapsed_fid, expected, rtol=1e-3)
    assert floor.shape == (10,) and np.isfinite(floor).all() and (floor >= 0).all()


def test_load_classifier_net_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="configs/classifier/fashion_mnist.yaml"):
        load_classifier_net(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a ClassifierModule checkpoint"):
        load_classifier_net(tmp_path / "other.ckpt")


def test_config_fast_dev_run_logs_accuracy(tmp_path: Path) -> None:
    """The Fashion-MNIST classifier config, shrunk by the shared tiny overrides."""
    cli = run_cli("fit", CLASSIFIER_CONFIG, "--trainer.fast_dev_run=true", root=tmp_path)
    assert isinstance(cli.model, ClassifierModule)
    assert {"train/acc", "val/acc", "val/loss"} <= set(cli.trainer.callback_metrics)
    path = tmp_path / "cli.ckpt"  # fast_dev_run writes no checkpoint: save one by hand
    cli.trainer.save_checkpoint(path)
    images = torch.randn(2, 1, 8, 8)
    expected = cli.model.net.eval()(images)
    torch.testing.assert_close(load_classifier_net(path)(images), expected)
    restored = ClassifierModule.load_from_checkpoint(path, map_location="cpu")  # LightningCLI rebuilds the net
    torch.testing.assert_close(restored.net.eval()(images), expected)


def test_config_trains_a_clean_classifier(tmp_path: Path) -> None:
    cli = run_cli(None, CLASSIFIER_CONFIG, root=tmp_path, tiny=False)
    assert cli.model.process is None and not cli.model.net.time_conditional
    assert (cli.model.net.image_size, cli.model.net.in_channels) == (32, 1) and cli.model.net.num_classes == 10
