"""Scoring sample files: FID, KID, IS and precision/recall against closed forms and torchmetrics; the
``diffusion-pl-eval`` command end to end (table, JSON, statistics file, one-screen errors)."""

from __future__ import annotations

import configparser
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from analytic import gaussian_features
from helpers import REPO
from PIL import Image
from test_fid import FlattenFeatures
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_pl.cli.evaluate import main
from diffusion_pl.data import Digits, ImageFormat
from diffusion_pl.metrics import (
    FeatureReference,
    GaussianMoments,
    RealReference,
    frechet_distance,
    inception_score,
    kernel_distance,
    precision_recall,
)
from diffusion_pl.metrics.generative import PrecomputedFeatures
from diffusion_pl.metrics.precision_recall import knn_radii
from diffusion_pl.metrics.scoring import ReferenceFeaturesError
from diffusion_pl.metrics.statistics_file import load_statistics, save_statistics
from diffusion_pl.nets.classifier import load_classifier_net
from diffusion_pl.nets.clip import CLIPNet, load_clip

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSIFIER = REPO / "tests" / "data" / "noisy_classifier_tiny.ckpt"  # 8x8 grayscale digits, 10 classes


def double(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sqrtm_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy's matrix square root."""
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


# ----------------------------------------------------------------------------------------------- FID


def test_frechet_distance_of_gaussians_equals_the_closed_form() -> None:
    """Commuting covariances Q A Q^T, Q B Q^T: |m1 - m2|^2 + sum_i (sqrt a_i - sqrt b_i)^2; general ones: scipy's
    sqrtm formula; features with exactly these sample moments give the same number."""
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a, b = double(4.0, 2.0, 1.0, 0.5, 1e-3), double(1.0, 3.0, 1.0, 0.1, 1e-3)
    m1, m2 = torch.zeros(5, dtype=torch.float64), double(-1.0, -0.5, 0.0, 0.5, 1.0)
    first, second = GaussianMoments(m1, q @ a.diag() @ q.T, 100), GaussianMoments(m2, q @ b.diag() @ q.T, 100)
    expected = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(first, first) == pytest.approx(0.0, abs=1e-9)
    real = gaussian_features(m1, first.covariance, 300, seed=1)
    fake = gaussian_features(m2, second.covariance, 200, seed=2)
    assert frechet_distance(GaussianMoments.of(real), GaussianMoments.of(fake)) == pytest.approx(expected, rel=1e-8)

    generator = torch.Generator().manual_seed(3)
    l1, l2 = (torch.randn(5, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    s1, s2 = l1 @ l1.T, l2 @ l2.T  # not commuting
    assert frechet_distance(GaussianMoments(m1, s1, 100), GaussianMoments(m2, s2, 100)) == pytest.approx(
        sqrtm_fid(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy()), rel=1e-8)


def test_frechet_distance_matches_torchmetrics_on_the_same_features() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(16, 16, generator=generator)
    real = torch.randn(400, 16, generator=generator) @ mixing
    fake = 0.3 + torch.randn(150, 16, generator=generator) @ mixing * 1.2
    metric = FrechetInceptionDistance(PrecomputedFeatures(16))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = frechet_distance(GaussianMoments.of(real), GaussianMoments.of(fake))
    assert ours > 1.0 and ours == pytest.approx(float(metric.compute()), rel=1e-6)


# ----------------------------------------------------------------------------------------------- KID


def expected_kernel(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> float:
    """E k(x, y) for independent x ~ N(m1, S1), y ~ N(m2, S2) and k(x, y) = (x.y / d + 1)^3: given y, x.y / d is
    N(m1.y / d, y^T S1 y / d^2), whose (1 + Z)^3 has mean (1 + mu)^3 + 3 (1 + mu) v; then the moments over y."""
    d = len(m1)
    a = m1 @ m2 / d
    quadratic = torch.trace(s1 @ s2) + m2 @ s1 @ m2  # E[y^T S1 y]
    value = ((1 + a) ** 3 + 3 * (1 + a) * (m1 @ s2 @ m1) / d**2
             + 3 / d**2 * ((1 + a) * quadratic + 2 / d * (m1 @ s2 @ s1 @ m2)))
    return float(value)


def test_kid_is_unbiased_for_the_closed_form_mmd_of_gaussians() -> None:
    """KID's U-statistic has expectation MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y) exactly, at any subset size."""
    m1, m2 = double(0.0, 0.0, 0.0), double(1.0, -0.5, 0.5)
    s1, s2 = double(1.0, 0.5, 2.0).diag(), double(0.5, 1.0, 1.0).diag()
    mmd2 = (expected_kernel(m1, s1, m1, s1) + expected_kernel(m2, s2, m2, s2) - 2 * expected_kernel(m1, s1, m2, s2))
    generator = torch.Generator().manual_seed(0)
    real = m1 + torch.randn(20000, 3, generator=generator, dtype=torch.float64) * s1.diagonal().sqrt()
    fake = m2 + torch.randn(20000, 3, generator=generator, dtype=torch.float64) * s2.diagonal().sqrt()
    kid, kid_std = kernel_distance(real, fake, subsets=100, subset_size=1000, seed=0)
    assert mmd2 > 0.5 and kid_std > 0
    assert kid == pytest.approx(mmd2, rel=0.03)  # the mean of 100 subsets: standard error ~ 1% here
    same, _ = kernel_distance(real[:10000], real[10000:], subsets=50, subset_size=1000, seed=0)
    assert abs(same) < 0.03 * mmd2


def test_kid_matches_torchmetrics_with_the_same_subsets() -> None:
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 32, generator=generator), 0.2 + torch.randn(250, 32, generator=generator)
    metric = KernelInceptionDistance(PrecomputedFeatures(32), subsets=7, subset_size=100)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(5)  # torchmetrics draws its subsets from the global RNG
    expected = [float(value) for value in metric.compute()]
    assert kernel_distance(real, fake, subsets=7, subset_size=100, seed=5) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------- IS


def test_inception_score_closed_forms_and_torchmetrics() -> None:
    """Uniform predictions: IS = 1; confident predictions spread evenly over K classes: IS = K."""
    assert inception_score(torch.zeros(40, 5), splits=2)[0] == pytest.approx(1.0)
    confident = 30.0 * torch.eye(5).repeat(8, 1)
    assert inception_score(confident, splits=1)[0] == pytest.approx(5.0, rel=1e-6)
    logits = torch.randn(90, 7, generator=torch.Generator().manual_seed(0)) * 3
    metric = InceptionScore(PrecomputedFeatures(7), splits=3)
    metric.update(logits)
    torch.manual_seed(4)  # torchmetrics shuffles with the global RNG
    expected = [float(value) for value in metric.compute()]
    assert inception_score(logits, splits=3, seed=4) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------- precision/recall


def grid(offset: float, count: int = 40) -> Tensor:
    """``count`` points on a line with spacing 1, starting at ``offset`` (2-D features)."""
    x = torch.arange(count, dtype=torch.float64) + offset
    return torch.stack([x, torch.zeros_like(x)], dim=1)


def test_knn_radii_are_distances_to_the_kth_other_point() -> None:
    radii = knn_radii(grid(0.0, 6), k=3)
    assert radii.tolist() == [3.0, 2.0, 2.0, 2.0, 2.0, 3.0]


def test_precision_recall_closed_forms() -> None:
    a, b, c = grid(0.0), grid(1000.0), grid(5000.0)
    assert precision_recall(a, a.clone(), k=3) == (1.0, 1.0)  # identical sets
    assert precision_recall(a, b, k=3) == (0.0, 0.0)  # disjoint and far apart
    # half overlap: real = A + B, generated = A + C: half the generated in the real manifold, half the real covered
    assert precision_recall(torch.cat([a, b]), torch.cat([a, c]), k=3) == (0.5, 0.5)
    # mode dropping: generated = A only; all of it is real-looking, half the real is covered
    assert precision_recall(torch.cat([a, b]), a.clone(), k=3) == (1.0, 0.5)


# ----------------------------------------------------------------------------------------------- the command


def digits(split: str) -> tuple[Tensor, Tensor]:
    data = Digits().load(split, ImageFormat(image_size=8, channels=1, resize_mode="resize"))
    return data.images, data.labels


def write_npz(path: Path, images: Tensor, **arrays: np.ndarray) -> Path:
    np.savez(path, samples=images.permute(0, 2, 3, 1).numpy(), **arrays)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the command in-process: (exit status, stdout, stderr)."""
    try:
        main(list(args))
        status = 0
    except SystemExit as done:
        status = int(done.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@torch.no_grad()
def features_of(images: Tensor) -> np.ndarray:
    return load_classifier_net(CLASSIFIER).features(images.float() / 127.5 - 1).double().numpy()


def fid_of_features(real: np.ndarray, fake: np.ndarray) -> float:
    return sqrtm_fid(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def test_command_scores_an_npz_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Domain FID, its floor, KID, precision/recall and on-target share of 120 real train digits against the test
    split, each against an independent computation; the saved statistics file gives the same numbers."""
    train_images, _ = digits("train")
    test_images, _ = digits("test")
    samples = train_images[:120]
    net = load_classifier_net(CLASSIFIER)
    predicted = net(samples.float() / 127.5 - 1).argmax(-1)
    labels = torch.where(torch.arange(120) % 2 == 0, predicted, (predicted + 1) % 10)  # half on target exactly
    npz = write_npz(tmp_path / "samples.npz", samples, labels=labels.numpy())
    common = ["--domain", str(CLASSIFIER), "--resize-mode", "resize", "--floor", "--kid", "--kid-subsets", "10",
              "--precision-recall"]
    status, out, err = run(capsys, str(npz), "--reference", "Digits:test", *common, "--on-target", str(CLASSIFIER),
                           "--save-reference", str(tmp_path / "digits_test.npz"))
    assert status == 0, err
    report = json.loads((tmp_path / "samples.scores.json").read_text())
    metrics = report["metrics"]
    reference = features_of(test_images)
    assert metrics["domain/fid"] == pytest.approx(fid_of_features(reference, features_of(samples)), rel=1e-4)
    held_out = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:120]]
    assert metrics["domain/fid_floor"] == pytest.approx(fid_of_features(reference, features_of(held_out)), rel=1e-4)
    assert metrics["on_target"] == 0.5
    assert set(report["details"]["on_target_per_class"]) <= {str(c) for c in range(10)}
    assert 0 <= metrics["domain/precision"] <= 1 and 0 <= metrics["domain/recall"] <= 1
    assert metrics["domain/kid_std"] > 0
    assert report["settings"]["num_samples"] == 120
    assert report["settings"]["reference"]["source"]["class_path"].endswith(".Digits")
    table = out.splitlines()
    assert table[:2] == ["| metric | value |", "|---|---|"]
    assert f"| domain/fid | {metrics['domain/fid']:.6g} |" in table and "| on_target | 0.5 |" in table

    status, _, err = run(capsys, str(npz), "--reference", str(tmp_path / "digits_test.npz"), *common,
                         "--json", str(tmp_path / "from_file.json"))
    assert status == 0, err
    from_file = json.loads((tmp_path / "from_file.json").read_text())["metrics"]
    assert from_file == pytest.approx({k: v for k, v in metrics.items() if k != "on_target"}, rel=1e-6)


def test_command_on_the_reference_itself_gives_zero_fid_and_full_precision_recall(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test_images, _ = digits("test")
    npz = write_npz(tmp_path / "real.npz", test_images)
    status, _, err = run(capsys, str(npz), "--reference", "Digits", "--resize-mode", "resize",
                         "--domain", str(CLASSIFIER), "--precision-recall")
    assert status == 0, err
    metrics = json.loads((tmp_path / "real.scores.json").read_text())["metrics"]
    assert metrics["domain/fid"] == pytest.approx(0.0, abs=1e-6)
    assert (metrics["domain/precision"], metrics["domain/recall"]) == (1.0, 1.0)


def test_command_runs_inception_metrics_offline_on_an_image_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], random_inception_weights: Path) -> None:
    """Samples from a folder of PNGs, a reference folder, Inception from a local weights file: FID, KID, IS."""
    test_images, _ = digits("test")
    for folder, images in (("samples", test_images[:10]), ("real", test_images[100:112])):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[0].numpy()).save(tmp_path / folder / f"{i:03d}.png")
    status, _, err = run(capsys, str(tmp_path / "samples"), "--reference", str(tmp_path / "real"), "--inception",
                           "--inception-weights", str(random_inception_weights), "--kid", "--kid-subsets", "3",
                           "--inception-score", "--is-splits", "2", "--batch-size", "6")
    assert status == 0, err
    report = json.loads((tmp_path / "samples.scores.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"inception/fid", "inception/kid", "inception/kid_std", "inception/is",
                            "inception/is_std"}
    assert metrics["inception/fid"] > 0 and 1.0 <= metrics["inception/is"] <= 1008
    assert report["settings"]["image_shape"] == [1, 8, 8]
    assert report["settings"]["reference"]["source"]["class_path"].endswith(".ImageFolder")


def test_command_clip_score_is_the_mean_cosine_to_each_prompt(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny exported CLIP file; the score equals cos(g(x_i), h(c_i)) averaged, and a shuffled pairing scores
    otherwise (each image is compared with its own prompt)."""
    torch.manual_seed(0)
    path = CLIPNet(image_size=8, vision_layers=1, transformer_layers=1, context_length=8).export(tmp_path / "clip.pt")
    images, labels = digits("test")
    images = images[:20]
    prompts = [f"a photo of a {digit}" for digit in labels[:20].tolist()]
    npz = write_npz(tmp_path / "prompted.npz", images, prompts=np.array(prompts))
    status, _, err = run(capsys, str(npz), "--clip", str(path), "--batch-size", "8")
    assert status == 0, err
    score = json.loads((tmp_path / "prompted.scores.json").read_text())["metrics"]["clip_score"]
    net = load_clip(path)
    with torch.no_grad():
        cosines = F.cosine_similarity(net.encode_image(images.float() / 127.5 - 1), net.encode_text(prompts))
        shuffled = F.cosine_similarity(net.encode_image(images.float() / 127.5 - 1), net.encode_text(prompts[::-1]))
    assert score == pytest.approx(float(cosines.mean()), rel=1e-5)
    assert abs(float(shuffled.mean()) - score) > 1e-4


@pytest.mark.parametrize(("arrays", "args", "expected"), [
    ({"pictures": np.zeros((4, 8, 8, 1), np.uint8)}, ["--domain", str(CLASSIFIER), "--reference", "Digits"],
     "has no images or samples array"),
    ({"samples": np.zeros((4, 16, 16, 1), np.uint8)}, ["--domain", str(CLASSIFIER), "--reference", "Digits"],
     "takes (1, 8, 8)"),
    ({"samples": np.zeros((4, 8, 8, 1), np.uint8)}, ["--on-target", str(CLASSIFIER)], "pass --labels"),
    ({"samples": np.zeros((4, 8, 8, 1), np.uint8)}, ["--domain", str(CLASSIFIER)], "add --reference"),
    ({"samples": np.zeros((4, 8, 8, 1), np.uint8)}, ["--clip", "ViT-B/32"], "has no 'prompts' array"),
    ({"samples": np.zeros((4, 8, 8, 1), np.uint8)}, [], "no metric chosen"),
    ({"samples": np.zeros((4, 8, 8, 1), np.uint8)}, ["--domain", str(CLASSIFIER), "--reference", "imagenet"],
     "neither an image folder"),
])
def test_command_user_errors_exit_2_with_one_screen(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    arrays: dict[str, np.ndarray], args: list[str],
                                                    expected: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    status, out, err = run(capsys, str(tmp_path / "bad.npz"), *args)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert len(err.splitlines()) <= 14
    assert not (tmp_path / "bad.scores.json").exists()


def test_statistics_files_are_checked_against_the_samples_and_the_network(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file of another image size, of another network's features, or with mu/sigma only (pytorch-fid's format)
    where KID needs features: exit 2 with what to do."""
    moments = GaussianMoments(torch.zeros(32, dtype=torch.float64), torch.eye(32, dtype=torch.float64), 10)
    other_net = FeatureReference(moments, torch.zeros(10, 32), "classifier", "0" * 64)
    save_statistics(tmp_path / "size16.npz", {"domain": other_net}, {"image_format": {"image_size": 16, "channels": 1}})
    save_statistics(tmp_path / "other_net.npz", {"domain": other_net}, {"image_format": {"image_size": 8, "channels": 1}})
    np.savez(tmp_path / "pytorch_fid.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    npz = write_npz(tmp_path / "samples.npz", digits("test")[0][:10])
    for reference, args, expected in [
        ("size16.npz", ["--domain", str(CLASSIFIER)], "holds statistics of 1 x 16 x 16 images"),
        ("other_net.npz", ["--domain", str(CLASSIFIER)], "of another classifier network"),
        ("pytorch_fid.npz", ["--domain", str(CLASSIFIER)], "has no 'domain' statistics (it has inception)"),
        ("missing.npz", ["--domain", str(CLASSIFIER)], "not found"),
    ]:
        status, _, err = run(capsys, str(npz), "--reference", str(tmp_path / reference), *args)
        assert status == 2 and expected in err, (reference, err)
    references, meta = load_statistics(tmp_path / "pytorch_fid.npz")
    assert meta == {} and references["inception"].features is None and references["inception"].fingerprint is None
    with pytest.raises(ReferenceFeaturesError, match="hold only mu and sigma"):
        RealReference(FlattenFeatures(2048), references["inception"]).kid(torch.zeros(5, 2048))


def test_command_exit_status_from_a_fresh_process(tmp_path: Path) -> None:
    """The installed entry point (setup.cfg) is the module's main, and a missing file exits with status 2."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    module, _, function = scripts["diffusion-pl-eval"].partition(":")
    assert getattr(importlib.import_module(module), function) is main
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", module, str(tmp_path / "missing.npz"), "--on-target",
                             str(CLASSIFIER)], check=False, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "does not exist" in result.stderr
