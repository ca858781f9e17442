"""FID / KID / IS: closed forms, domain-feature properties, cached references, Inception offline, DDP = 1 process."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from analytic import gaussian_features
from helpers import DDPM_FASHION, REPO, LossRecorder, cli_process, last_checkpoint, run_cli, run_trainer, tiny_args
from lightning.pytorch.loggers import Logger
from test_classifier import train_digits_classifier
from torch import Tensor

import diffusion_pl.callbacks.fid as fid_module
from diffusion_pl.callbacks.fid import FID, batch_seed, rank_batches
from diffusion_pl.cli import DiffusionCLI
from diffusion_pl.data import Digits, ImageFormat
from diffusion_pl.metrics import (
    ClassifierFeatures,
    FeatureExtractor,
    Features,
    GenerativeMetrics,
    InceptionFeatures,
    InceptionWeightsError,
    ReferenceStatistics,
    cached_reference,
    inception_input,
    reference_statistics,
)

FID_OVERLAY = REPO / "overlays" / "fid_fashion_mnist.yaml"


class FlattenFeatures(FeatureExtractor):
    """Features = the pixels themselves (a fixed, exact extractor for closed-form checks)."""

    name = "flatten"

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.calls = 0

    def forward(self, images: Tensor) -> Features:
        self.calls += 1
        return Features(images.flatten(1))


def fid_of(real: Tensor, generated: Tensor, extractor: FeatureExtractor, batch_size: int = 500) -> float:
    """FID through the library path: reference statistics of ``real``, one update with ``generated``."""
    stats = reference_statistics(real.split(batch_size), extractor, len(real), kid_size=len(real))
    metrics = GenerativeMetrics(extractor.num_features, kid_subsets=5, kid_subset_size=min(len(real), len(generated)))
    metrics.load_reference(stats)
    with torch.no_grad():
        metrics.update(Features(torch.cat([extractor(x).features for x in generated.split(batch_size)])))
    return metrics.compute(seed=0)["fid"]


# ----------------------------------------------------------------------------------------------- FID math


def test_fid_equals_closed_form_for_gaussians_with_commuting_covariances() -> None:
    """FID(N(m1, Q A Q^T), N(m2, Q B Q^T)) = |m1 - m2|^2 + sum_i (sqrt a_i - sqrt b_i)^2."""
    dim = 6
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    a = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 1e-3], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0, 1.0, 0.1, 2.00, 1e-3], dtype=torch.float64)
    m1, m2 = torch.zeros(dim, dtype=torch.float64), torch.linspace(-1, 1, dim, dtype=torch.float64)
    real = gaussian_features(m1, q @ torch.diag(a) @ q.T, 400, seed=2)
    fake = gaussian_features(m2, q @ torch.diag(b) @ q.T, 300, seed=3)
    expected = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert fid_of(real, fake, FlattenFeatures(dim)) == pytest.approx(expected, rel=1e-6)


def test_fid_equals_scipy_sqrtm_on_the_same_features() -> None:
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(700, 12, generator=generator) @ torch.randn(12, 12, generator=generator)
    fake = 0.5 + torch.randn(500, 12, generator=generator) @ torch.randn(12, 12, generator=generator)
    r, f = real.double().numpy(), fake.double().numpy()
    s1, s2 = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    expected = np.sum((r.mean(0) - f.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid_of(real, fake, FlattenFeatures(12)) == pytest.approx(expected, rel=1e-5)


def test_metric_compute_is_seeded_and_leaves_the_global_rng_alone() -> None:
    stats = reference_statistics([torch.randn(64, 4)], FlattenFeatures(4), 64, kid_size=64)
    results = []
    state = torch.get_rng_state()
    for _ in range(2):
        metrics = GenerativeMetrics(4, num_logits=3, kid_subsets=4, kid_subset_size=16, is_splits=2)
        metrics.load_reference(stats)
        metrics.update(Features(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)),
                                torch.randn(32, 3, generator=torch.Generator().manual_seed(2))))
        results.append(metrics.compute(seed=7))
    assert results[0] == results[1] and {"fid", "kid", "kid_std", "is", "is_std"} == set(results[0])
    assert 1.0 <= results[0]["is"] <= 3.0
    assert torch.equal(state, torch.get_rng_state())


def test_sampling_batches_do_not_depend_on_world_size() -> None:
    single = rank_batches(45, 8, 0, 1)
    assert single[0] == (0, 8) and single[-1] == (40, 45)
    for world in (2, 3, 4, 7):
        shards = [rank_batches(45, 8, rank, world) for rank in range(world)]
        assert [b for shard in shards for b in shard] == single
    assert batch_seed(0, 8) != batch_seed(1, 0)


class StubModel(pl.LightningModule):
    """Records what the FID callback asks for; images are drawn from the given generator only."""

    def __init__(self, num_classes: int | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.labels: list[Tensor | None] = []

    def example_batch(self, num_samples: int, real: Tensor | None = None) -> dict[str, Tensor]:
        return {} if self.num_classes is None else {"label": torch.arange(num_samples) % self.num_classes}

    def sample(self, num_samples: int, *, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        self.labels.append(batch.get("label"))
        return torch.rand(num_samples, 1, 2, 2, generator=generator) * 2 - 1


@pytest.mark.parametrize("num_classes", [None, 3])
def test_generated_images_and_labels_do_not_depend_on_world_size(num_classes: int | None) -> None:
    callback = FID(lambda: FlattenFeatures(4), num_samples=10, batch_size=4)
    callback.extractor = FlattenFeatures(4)
    single, _ = callback._generate(StubModel(num_classes), rank=0, world_size=1)
    model = StubModel(num_classes)
    shards = [callback._generate(model, rank=rank, world_size=2)[0].features for rank in (0, 1)]
    torch.testing.assert_close(torch.cat(shards), single.features, rtol=0, atol=0)
    if num_classes is None:
        assert model.labels == [None, None, None]
    else:
        assert [labels.tolist() for labels in model.labels] == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0]]


# ----------------------------------------------------------------------------------------------- domain features


@pytest.fixture(scope="module")
def digits_classifier_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained digits classifier (the domain extractor of the tests)."""
    path, _, _ = train_digits_classifier(tmp_path_factory.mktemp("classifier"), max_steps=60)
    return path


def digits(split: str) -> Tensor:
    data = Digits().load(split, ImageFormat(image_size=8, channels=1, resize_mode="resize"))
    return data.images.float() / 127.5 - 1.0


def blur(images: Tensor, strength: float) -> Tensor:
    """Mix each image with its 3x3 box blur: 0 = unchanged, 1 = fully blurred."""
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (1 - strength) * images + strength * blurred


def test_domain_fid_small_for_real_splits_large_for_noise_and_monotone(digits_classifier_ckpt: Path) -> None:
    extractor = ClassifierFeatures(str(digits_classifier_ckpt))
    train, test = digits("train"), digits("test")
    real_vs_real = fid_of(train, test, extractor)
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_vs_noise = fid_of(train, noise, extractor)
    assert real_vs_noise > 20 * real_vs_real
    eps = torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    noisy = [fid_of(train, (test + s * eps).clamp(-1, 1), extractor) for s in (0.0, 0.2, 0.4, 0.8)]
    assert noisy == sorted(noisy) and noisy[-1] > 5 * noisy[0]
    blurred = [fid_of(train, blur(test, s), extractor) for s in (0.0, 0.5, 1.0)]
    assert blurred == sorted(blurred)


def test_extractors_never_leave_eval_mode(digits_classifier_ckpt: Path) -> None:
    state = torch.get_rng_state()
    extractor = ClassifierFeatures(str(digits_classifier_ckpt))
    assert torch.equal(state, torch.get_rng_state())  # building it leaves a training run's random stream alone
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())
    images = digits("test")[:16]
    torch.testing.assert_close(extractor(images).features, extractor(images).features, rtol=0, atol=0)
    assert not any(p.requires_grad for p in extractor.parameters())


# ----------------------------------------------------------------------------------------------- caching


def test_reference_statistics_are_cached_and_keyed(tmp_path: Path) -> None:
    extractor = FlattenFeatures(4)
    images = torch.randn(10, 4)
    key = {"source": "toy", "split": "train", "image_size": 2, "extractor": extractor.name,
           "extractor_fingerprint": extractor.fingerprint()}

    def compute() -> ReferenceStatistics:
        return reference_statistics(images.split(3), extractor, 10, kid_size=5)

    first = cached_reference(tmp_path, key, compute)
    calls = extractor.calls
    second = cached_reference(tmp_path, key, compute)
    assert extractor.calls == calls == 4 and len(list(tmp_path.iterdir())) == 1
    assert second.num_images == 10 and torch.equal(first.feature_outer_sum, second.feature_outer_sum)
    torch.testing.assert_close(second.feature_sum, images.double().sum(0))
    assert second.kid_features.shape == (5, 4)
    cached_reference(tmp_path, {**key, "split": "test"}, compute)
    assert extractor.calls == 8 and len(list(tmp_path.iterdir())) == 2


class RecordingLogger(Logger):
    """Keeps what the FID callback logs straight to the loggers (every_n_steps mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


def fid_callback(ckpt: Path, cache: Path, **kwargs: object) -> FID:
    options = {"num_samples": 24, "batch_size": 8, "kid_subsets": 5, "kid_subset_size": 12, **kwargs}
    return FID(lambda: ClassifierFeatures(str(ckpt)), cache_dir=str(cache), **options)


def test_callback_logs_during_fit_and_reuses_the_cached_reference(tmp_path: Path, digits_classifier_ckpt: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    computed = []
    original = fid_module.reference_statistics

    def counting(*args: object, **kwargs: object) -> ReferenceStatistics:
        computed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fid_module, "reference_statistics", counting)
    cache = tmp_path / "cache"
    # The FID callbacks are built after the CLI (and its seeding), as an overlay's are.
    cli = run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                      "--trainer.limit_val_batches=1", "--model.init_args.sampler.steps=4", root=tmp_path / "val",
                      configure=lambda cli: cli.trainer.callbacks.append(fid_callback(digits_classifier_ckpt, cache)))
    assert {"val/fid", "val/kid", "val/kid_std"} <= set(cli.trainer.callback_metrics)
    assert len(computed) == 1

    recorder = RecordingLogger()

    def add_fid_and_recorder(cli: DiffusionCLI) -> None:
        cli.trainer.callbacks.append(fid_callback(digits_classifier_ckpt, cache, every_n_steps=2))
        cli.trainer.loggers = [*cli.trainer.loggers, recorder]

    run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                "--model.init_args.sampler.steps=4", root=tmp_path / "steps", configure=add_fid_and_recorder)
    logged = [(step, values) for step, values in recorder.records if "val/fid" in values]
    assert [step for step, _ in logged] == [2, 4] and logged[0][1]["val/fid"] > 0
    assert len(computed) == 1, "the second run must reuse the cached reference statistics"
    assert len(list(cache.iterdir())) == 1


def test_fid_callback_leaves_the_training_run_unchanged(tmp_path: Path, digits_classifier_ckpt: Path) -> None:
    """Adding the FID callback (built after seeding, as the overlay's is, and evaluating at step 2) changes no
    training loss: its extractor's construction and its sampling draw nothing from the global RNG."""
    losses = []
    for with_fid in (False, True):
        recorder = LossRecorder()
        add_fid = (lambda cli: cli.trainer.callbacks.append(
            fid_callback(digits_classifier_ckpt, tmp_path / "cache", every_n_steps=2))) if with_fid else None
        run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                    "--trainer.log_every_n_steps=1", "--model.init_args.sampler.steps=4",
                    root=tmp_path / f"fid_{with_fid}", callbacks=[recorder], configure=add_fid)
        losses.append(recorder.losses)
    assert len(losses[0]) == 4 and losses[0] == losses[1]


# ----------------------------------------------------------------------------------------------- Inception


def test_inception_input_is_the_single_conversion() -> None:
    images = torch.tensor([-1.0, 0.0, 1.0, 0.5]).reshape(1, 1, 2, 2)
    pixels = inception_input(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 2, 2)
    assert pixels[0, :, 0, 0].tolist() == [0, 0, 0] and pixels[0, 2].flatten().tolist() == [0, 128, 255, 191]


def test_inception_runs_offline_from_a_local_weights_file(random_inception_weights: Path) -> None:
    state = torch.get_rng_state()
    extractor = InceptionFeatures(str(random_inception_weights))
    assert torch.equal(state, torch.get_rng_state())
    extractor.train()
    assert not any(m.training for m in extractor.modules())
    gray = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first, second = extractor(gray), extractor(gray)
    assert first.features.shape == (2, 2048) and first.logits is not None and first.logits.shape == (2, 1008)
    torch.testing.assert_close(first.features, second.features, rtol=0, atol=0)
    torch.testing.assert_close(extractor(gray.expand(-1, 3, -1, -1)).features, first.features, rtol=0, atol=0)
    assert extractor.fingerprint() == InceptionFeatures(str(random_inception_weights)).fingerprint()


def test_inception_offline_without_weights_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", offline)
    with pytest.raises(InceptionWeightsError, match="weights_path") as info:
        InceptionFeatures()
    assert fidelity_inception.URL_INCEPTION_V3 in str(info.value)
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        InceptionFeatures(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------------------------- CLI test and DDP


def overlay_for(classifier_ckpt: Path, cache: Path, root: Path) -> Path:
    """The Fashion-MNIST FID overlay pointed at a test classifier, a test cache and a small sample count."""
    text = FID_OVERLAY.read_text()
    default_path = "runs/classifier_fashion_mnist/lightning_logs/version_0/checkpoints/last.ckpt"
    text = text.replace(default_path, str(classifier_ckpt))
    text = text.replace("num_samples: 500", "num_samples: 24").replace("batch_size: 250", "batch_size: 6")
    text += f"        cache_dir: {cache}\n        kid_subsets: 10\n        kid_subset_size: 12\n"
    path = root / "fid_overlay.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_test_subcommand_writes_json_and_ddp_matches_one_process(tmp_path: Path, digits_classifier_ckpt: Path) -> None:
    """``diffusion-pl test --ckpt_path``: same FID/KID with 2 gloo processes as with 1, JSON next to the checkpoint."""
    # The command line (config files and overrides), not the checkpoint's hyperparameters, sets the test sampler.
    run_cli("fit", DDPM_FASHION, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--model.init_args.sampler=DDPM", root=tmp_path / "train")
    ckpt = last_checkpoint(tmp_path / "train")
    overlay = overlay_for(digits_classifier_ckpt, tmp_path / "cache", tmp_path)
    report = ckpt.with_suffix(".metrics.json")
    results = {}
    for name, extra in (("single", ["--trainer.devices=1"]),
                        ("ddp", ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"])):
        cli_process("test", *tiny_args(tmp_path / name, "--trainer.limit_test_batches=1", "--data.init_args.batch_size=8",
                                       *extra, "--model.init_args.sampler=DDIM", "--model.init_args.sampler.steps=5",
                                       "--ckpt_path", str(ckpt), overlays=[overlay]), timeout=300)
        results[name] = json.loads(report.read_text())
        report.unlink()
    single, ddp = results["single"], results["ddp"]
    assert single["world_size"] == 1 and ddp["world_size"] == 2 and single["num_samples"] == 24
    assert single["reference"]["extractor"] == "classifier"
    assert (single["model"]["sampler"], single["model"]["sampler/steps"]) == ("DDIM", 5)
    for name in ("test/fid", "test/kid", "test/kid_std"):
        assert ddp["metrics"][name] == pytest.approx(single["metrics"][name], rel=1e-5, abs=1e-7), name
    assert single["metrics"]["test/fid"] > 0
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the DDP run reused the cached reference
