"""Power-function EMA and post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3, App. C): gamma <-> sigma_rel against the
closed form, the update against the weighted average it stands for, post-hoc reconstruction of averages tracked live,
exact resume of both averages through the command line, and the ``diffusion-pl-ema`` command."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy import integrate

from diffusion_pl.callbacks.ema_snapshots import write_snapshot
from diffusion_pl.callbacks.posthoc_ema import read_snapshots, reconstruct
from diffusion_pl.callbacks.power_function import (
    MAX_SIGMA_REL,
    PowerAverage,
    gamma_to_sigma_rel,
    profile_inner_products,
    sigma_rel_to_gamma,
)
from diffusion_pl.core.errors import CheckpointNotFoundError, ConfigError


def profile_std(gamma: float) -> float:
    """The standard deviation of tau / t under the profile (gamma + 1) tau^gamma on [0, 1], from its moments
    E[tau] = (gamma + 1) / (gamma + 2) and E[tau^2] = (gamma + 1) / (gamma + 3)."""
    mean, second = (gamma + 1) / (gamma + 2), (gamma + 1) / (gamma + 3)
    return math.sqrt(second - mean ** 2)


@pytest.mark.parametrize("sigma_rel", [0.001, 0.01, 0.05, 0.08, 0.10, 0.15, 0.25, 0.288])
def test_gamma_of_sigma_rel_gives_a_profile_of_that_width(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert profile_std(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)


@pytest.mark.parametrize("gamma", [0.01, 0.5, 1.0, 6.94, 16.97, 100.0, 1000.0])
def test_sigma_rel_of_gamma_is_inverted(gamma: float) -> None:
    assert gamma_to_sigma_rel(gamma) == pytest.approx(profile_std(gamma), rel=1e-12)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-8)


def test_edm2_values() -> None:
    """EDM2 Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, MAX_SIGMA_REL, 0.3, math.nan])
def test_sigma_rel_out_of_range_is_refused(sigma_rel: float) -> None:
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(sigma_rel)


def trajectory(steps: int, dim: int = 400, seed: int = 0) -> list[torch.Tensor]:
    """Weights of a noisy optimisation: theta_t moves towards a target with noise; float32 like trained weights."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(dim, generator=generator, dtype=torch.float64)
    theta, out = torch.zeros(dim, dtype=torch.float64), []
    for _ in range(steps):
        theta = theta + 0.01 * (target - theta) + 0.05 * torch.randn(dim, generator=generator, dtype=torch.float64)
        out.append(theta.float())
    return out


def direct_average(thetas: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """sum_tau w_tau theta_tau with w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the profile
    (gamma + 1) tau^gamma / t^(gamma+1) integrated over each step, computed directly in float64."""
    t = len(thetas)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    w = (tau / t) ** (gamma + 1) - ((tau - 1) / t) ** (gamma + 1)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    return (w[:, None] * torch.stack(thetas).double()).sum(0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_update_is_the_power_function_average(sigma_rel: float) -> None:
    """theta_avg <- beta_t theta_avg + (1 - beta_t) theta_t, beta_t = (1 - 1/t)^(gamma+1), is after every t the direct
    weighted sum of theta_1..theta_t under the profile (float32, like the callback)."""
    thetas = trajectory(300)
    average = PowerAverage.of(sigma_rel, {"w": torch.zeros_like(thetas[0])})
    for t, theta in enumerate(thetas, start=1):
        average.update({"w": theta}, t)
        if t in (1, 2, 17, 300):
            assert relative_error(average.weights["w"], direct_average(thetas[:t], average.gamma)) < 2e-6, t
    assert relative_error(average.weights["w"], thetas[-1]) > 1e-2  # an average, not the last weights


@pytest.mark.parametrize(("t_a", "gamma_a", "t_b", "gamma_b"),
                         [(100.0, 6.94, 100.0, 16.97), (40.0, 6.94, 100.0, 16.97), (100.0, 3.0, 40.0, 0.5)])
def test_profile_inner_products_match_integration(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> None:
    def profile(tau: float, t: float, gamma: float) -> float:
        return (gamma + 1) * tau ** gamma / t ** (gamma + 1) if tau <= t else 0.0

    expected, _ = integrate.quad(lambda tau: profile(tau, t_a, gamma_a) * profile(tau, t_b, gamma_b), 0,
                                 min(t_a, t_b), epsabs=0, epsrel=1e-12, limit=200)
    found = profile_inner_products(*(torch.tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    assert float(found) == pytest.approx(expected, rel=1e-9)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[float, PowerAverage]]:
    """600 steps of :func:`trajectory` averaged live with sigma_rel 0.05, 0.08, 0.10; snapshots of 0.05 and 0.10 only,
    every 30 steps (20 files, 40 averages)."""
    directory = tmp_path_factory.mktemp("snapshots")
    thetas = trajectory(600, seed=1)
    live = {s: PowerAverage.of(s, {"w": torch.zeros_like(thetas[0]), "b": torch.zeros(3)}) for s in (0.05, 0.08, 0.10)}
    for t, theta in enumerate(thetas, start=1):
        for average in live.values():
            average.update({"w": theta, "b": theta[:3]}, t)
        if t % 30 == 0:
            write_snapshot(directory, t, [live[0.05], live[0.10]])
    return directory, live


def test_posthoc_reconstructs_an_average_tracked_live(synthetic_run: tuple[Path, dict[float, PowerAverage]]) -> None:
    """sigma_rel 0.08, tracked live but not snapshotted, is reconstructed from the 0.05 and 0.10 snapshots within 1e-3
    relative, and far better than either snapshot of the last step; a snapshotted one is returned as it is."""
    directory, live = synthetic_run
    snapshots = read_snapshots(directory)
    assert [s for s, _ in snapshots[:4]] == [30, 30, 60, 60] and len(snapshots) == 40
    reconstruction = reconstruct(snapshots, 0.08)
    assert reconstruction.step == 600 and reconstruction.gamma == pytest.approx(sigma_rel_to_gamma(0.08))
    target = live[0.08].weights
    error = max(relative_error(reconstruction.weights[name], target[name]) for name in target)
    assert error < 1e-3
    for other in (0.05, 0.10):
        assert error < relative_error(live[other].weights["w"], target["w"]) / 100
    tracked = reconstruct(snapshots, 0.10)
    assert relative_error(tracked.weights["w"], live[0.10].weights["w"]) < 1e-6
    assert sum(c for _, _, c in reconstruction.coefficients) == pytest.approx(1.0)


def test_posthoc_refuses_a_sigma_rel_out_of_range_and_an_empty_folder(
        synthetic_run: tuple[Path, dict[float, PowerAverage]], tmp_path: Path) -> None:
    directory, _ = synthetic_run
    with pytest.raises(ConfigError, match=r"sigma_rel must be in \(0, 0.2887\)"):
        reconstruct(read_snapshots(directory), 0.3)
    with pytest.raises(CheckpointNotFoundError, match="no power-EMA snapshots"):
        read_snapshots(tmp_path)
