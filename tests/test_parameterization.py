"""eps / x0 / v conversions, the score, and L_simple against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from analytic import point_mass_denoiser
from diffusion_pl.losses import SimpleLoss
from diffusion_pl.parameterization import (
    EDM,
    X0,
    Denoiser,
    Eps,
    Parameterization,
    V,
    Velocity,
    clip_denoised,
    from_prediction_kind,
    score_from_eps,
)
from diffusion_pl.processes import DiscreteProcess


@pytest.fixture
def setup() -> tuple[DiscreteProcess, Tensor, Tensor, Tensor, Tensor]:
    process = DiscreteProcess(1000, "cosine")
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 2, 4, 4, generator=gen), torch.randn(8, 2, 4, 4, generator=gen)
    t = torch.tensor([1, 2, 10, 100, 500, 900, 999, 1000])
    return process, x0, eps, t, process.add_noise(x0, t, eps)


PARTS = {"eps": Eps(), "x0": X0(), "v": V(), "velocity": Velocity(), "edm": EDM(0.5)}


@pytest.mark.parametrize("kind", PARTS)
def test_exact_target_recovers_x0_and_eps(setup, kind: str) -> None:
    process, x0, eps, t, x_t = setup
    part = PARTS[kind]
    pred = part.prediction(part.target(x0, eps, t, process), x_t, t, process)
    # x0 from eps divides by alpha(t) ~ 1e-2 at t = T in float32, so compare with a matching tolerance.
    torch.testing.assert_close(pred.x0, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(pred.eps, eps, atol=2e-3, rtol=1e-3)


def test_v_target_definition(setup) -> None:
    process, x0, eps, t, _ = setup
    a, s = process.alpha(t).view(-1, 1, 1, 1), process.sigma(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(V().target(x0, eps, t, process), a * eps - s * x0)


def test_score_of_gaussian_marginal() -> None:
    """For x0 = 0 the marginal is N(0, sigma^2): grad log q = -x / sigma^2, and E[eps | x_t] = x_t / sigma."""
    process = DiscreteProcess(1000, "linear")
    t = torch.tensor([10, 400])
    x_t = torch.randn(2, 3)
    sigma = process.sigma(t).view(-1, 1)
    torch.testing.assert_close(score_from_eps(x_t / sigma, t, process), -x_t / sigma**2)


def test_unknown_kind_errors(setup) -> None:
    process = setup[0]
    with pytest.raises(ValueError, match="choose one of eps, x0, v"):
        from_prediction_kind("score")
    with pytest.raises(ValueError, match="takes a Parameterization part"):
        Denoiser(nn.Identity(), process, "epsilon")  # type: ignore[arg-type]


def test_clip_denoised_clamps_and_stays_consistent(setup) -> None:
    process, _, _, t, x_t = setup
    wide = point_mass_denoiser(torch.full((1, 2, 4, 4), 3.0), process)
    pred = clip_denoised(wide, process)(x_t, t)
    assert pred.x0.max().item() == 1.0
    torch.testing.assert_close(process.add_noise(pred.x0, t, pred.eps), x_t, atol=1e-4, rtol=1e-4)


class OracleNet(nn.Module):
    """Predicts the exact target for a point-mass data set x0* (knows the data, not the noise)."""

    def __init__(self, x0_star: Tensor, process: DiscreteProcess, part: Parameterization) -> None:
        super().__init__()
        self.x0_star, self.process, self.part = x0_star, process, part

    def forward(self, x_t: Tensor, t_in: Tensor) -> Tensor:
        t = t_in.long()
        a, s = self.process.alpha(t).view(-1, 1, 1, 1), self.process.sigma(t).view(-1, 1, 1, 1)
        eps = (x_t - a * self.x0_star) / s
        return self.part.target(self.x0_star.expand_as(x_t), eps, t, self.process)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_simple_loss_zero_for_oracle_and_positive_otherwise(kind: str, weighting: str) -> None:
    process = DiscreteProcess(1000, "linear")
    x0_star = torch.full((1, 1, 4, 4), 0.25)
    loss = SimpleLoss(weighting)
    oracle = Denoiser(OracleNet(x0_star, process, from_prediction_kind(kind)), process, from_prediction_kind(kind))
    per_sample = loss(oracle, x0_star.expand(16, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert per_sample.shape == (16,)
    assert per_sample.max().item() < 1e-4
    shifted = loss(oracle, torch.full((16, 1, 4, 4), 0.75), generator=torch.Generator().manual_seed(0))
    assert shifted.min().item() > 0


def test_simple_loss_eps_is_unit_for_zero_net() -> None:
    """A net that always predicts 0 has E||eps - 0||^2 / D = 1 under eps-prediction (Ho et al. 2020, eq. 14)."""

    class Zero(nn.Module):
        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            return torch.zeros_like(x)

    process = DiscreteProcess(1000, "linear")
    den = Denoiser(Zero(), process, Eps())
    value = SimpleLoss()(den, torch.zeros(4096, 1, 4, 4), generator=torch.Generator().manual_seed(1)).mean()
    assert value.item() == pytest.approx(1.0, abs=0.02)


def test_min_snr_weights() -> None:
    process = DiscreteProcess(1000, "linear")
    t = torch.tensor([1, 1000])
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    for kind, expected in [("eps", snr.clamp(max=5) / snr), ("x0", snr.clamp(max=5)),
                           ("v", snr.clamp(max=5) / (snr + 1))]:
        weight = SimpleLoss("min_snr").weight(Denoiser(nn.Identity(), process, from_prediction_kind(kind)), t)
        torch.testing.assert_close(weight, expected)
    assert SimpleLoss("min_snr").weight(Denoiser(nn.Identity(), process, Eps()), t)[1].item() == pytest.approx(1.0)
