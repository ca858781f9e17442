"""Conditioner parts, guidance parts and the gradient helper, checked against what they must compute."""

from __future__ import annotations

import pytest
import torch

from analytic import gaussian_denoiser
from diffusion_pl.conditioning import ClassLabel, Compose, Conditioner
from diffusion_pl.guidance import ClassifierFree, log_prob_gradient
from diffusion_pl.nets import UNet
from diffusion_pl.parameterization import Denoiser, Prediction
from diffusion_pl.processes import DiscreteProcess


def test_class_label_drops_labels_at_the_configured_rate_only_while_training() -> None:
    conditioner = ClassLabel(num_classes=10, dropout=0.25)
    labels = torch.arange(40_000) % 10
    dropped = conditioner({"label": labels}, training=True, generator=torch.Generator().manual_seed(0))["y"] == 10
    # Binomial(40000, 0.25): standard deviation of the rate 0.0022; 5 sigma
    assert abs(dropped.float().mean().item() - 0.25) < 0.011
    assert torch.equal(conditioner({"label": labels}, training=False)["y"], labels)
    assert torch.equal(conditioner.null({"y": labels})["y"], torch.full_like(labels, 10))


def test_class_label_draws_dropout_from_the_global_rng_like_before() -> None:
    """Training noise must stay the exactly resumable global stream: dropout = torch.rand(shape) < p."""
    labels = torch.arange(64) % 10
    torch.manual_seed(3)
    got = ClassLabel(10, dropout=0.1)({"label": labels}, training=True)["y"]
    torch.manual_seed(3)
    expected = torch.where(torch.rand(labels.shape) < 0.1, torch.full_like(labels, 10), labels)
    assert torch.equal(got, expected)


def test_class_label_examples_cycle_through_the_classes_and_it_checks_the_net() -> None:
    assert ClassLabel(3).example_batch(7, "cpu")["label"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(KeyError, match="predict.labels"):
        ClassLabel(3)({}, training=True)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_classes=5)
    with pytest.raises(ValueError, match="num_classes=5"):
        ClassLabel(3).check_net(net)
    ClassLabel(5).check_net(net)


class Level(Conditioner):
    """A second conditioner for Compose: a constant level per sample."""

    def __init__(self, value: float = 0.5) -> None:
        super().__init__()
        self.value = value

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("level",)

    def forward(self, batch, *, training, generator=None):
        return {"cond_level": torch.full((len(batch["label"]),), self.value)}

    def null(self, cond):
        return {"cond_level": torch.zeros_like(cond["cond_level"])}

    def example_batch(self, num_samples, device):
        return {}


def test_compose_merges_parts_and_refuses_overlaps() -> None:
    compose = Compose([ClassLabel(4, dropout=0.0), Level(0.3)])
    cond = compose({"label": torch.tensor([1, 2])}, training=True)
    assert cond["y"].tolist() == [1, 2] and cond["cond_level"].tolist() == pytest.approx([0.3, 0.3])
    null = compose.null(cond)
    assert null["y"].tolist() == [4, 4] and null["cond_level"].tolist() == [0.0, 0.0]
    assert compose.batch_keys == ("label", "level")
    with pytest.raises(ValueError, match=r"\['y'\]"):
        Compose([ClassLabel(4), ClassLabel(4)])({"label": torch.tensor([1])}, training=False)


def test_classifier_free_part_without_a_condition_or_at_zero_returns_the_denoiser() -> None:
    process = DiscreteProcess(100, "cosine")
    denoise = Denoiser(UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1,), num_res_blocks=1,
                            attention_resolutions=(), num_classes=3), process).bind()
    assert ClassifierFree(3.0).wrap(denoise, batch={}, cond={}, null={}, process=process) is denoise
    y = {"y": torch.tensor([1])}
    assert ClassifierFree(0.0).wrap(denoise, batch={}, cond=y, null=y, process=process) is denoise


def test_log_prob_gradient_differentiates_through_the_denoiser() -> None:
    """CLIP on x0 needs d f(x0_hat(x_t)) / d x_t. For Gaussian data N(m, s^2) the exact x0_hat = m + g (x_t - a m)
    with gain g = a s^2 / (a^2 s^2 + sigma^2), so grad_x of -||x0_hat||^2 / 2 is -g x0_hat."""
    process = DiscreteProcess(100, "cosine")
    mean, std = torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.3])
    denoise = gaussian_denoiser(mean, std, process)
    x_t, t = torch.randn(5, 2), torch.randint(1, 101, (5,))

    def f(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return -0.5 * denoise(x, s).x0.pow(2).sum(1)

    with torch.no_grad():  # as inside a sampler
        grad = log_prob_gradient(f, x_t, t)
        a, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        gain = a * std**2 / (a**2 * std**2 + sigma**2)
        expected = -gain * denoise(x_t, t).x0
    torch.testing.assert_close(grad, expected)
    assert isinstance(denoise(x_t, t), Prediction)
