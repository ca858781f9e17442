"""Power-function EMA and post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3, App. C): gamma <-> sigma_rel against the
closed form, the update against the weighted average it stands for, post-hoc reconstruction of averages tracked live,
exact resume of both averages through the command line, and the ``diffusion-pl-ema`` command."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, Crash, set_callback, tiny_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import integrate

from diffusion_pl.callbacks import PowerEMA, SampleGrid, SampleWriter
from diffusion_pl.callbacks.ema_snapshots import read_snapshot, snapshot_files, write_snapshot
from diffusion_pl.callbacks.posthoc_ema import read_snapshots, reconstruct
from diffusion_pl.callbacks.power_function import (
    MAX_SIGMA_REL,
    PowerAverage,
    gamma_to_sigma_rel,
    profile_inner_products,
    sigma_rel_to_gamma,
)
from diffusion_pl.cli import DiffusionCLI
from diffusion_pl.cli.posthoc_ema import main as posthoc_main
from diffusion_pl.core.checkpoint_file import verify_checksum
from diffusion_pl.core.errors import CheckpointNotFoundError, ConfigError
from diffusion_pl.models import DiffusionModule


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


# ------------------------------------------------------------------------------------ through the command line

OVERLAY = str(REPO / "overlays" / "power_ema.yaml")
STEPS, CUT = 8, 4


class WeightRecorder(pl.Callback):
    """The raw trainable weights after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def power_fit(root: Path, *callbacks: pl.Callback, ckpt_path: Path | None = None) -> DiffusionCLI:
    """A tiny run of the demo with overlays/power_ema.yaml for :data:`STEPS` steps (validation at 3 and 6, snapshots
    every 2 steps), checkpoints every :data:`CUT` steps in ``root/ckpt``."""
    cli = tiny_cli(root, "--config", OVERLAY, f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=1",
                   "--trainer.val_check_interval=3")
    set_callback(cli, SampleGrid, every_n_steps=0, num_samples=2)
    set_callback(cli, PowerEMA, snapshot_every_n_steps=2)
    cli.trainer.callbacks.extend([ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=CUT, save_last=True),
                                  *callbacks])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An uninterrupted run (raw weights recorded), and one killed after step CUT and resumed from its checkpoint."""
    full, cut = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("cut")
    recorder = WeightRecorder()
    power_fit(full, recorder)
    with pytest.raises(SystemExit):
        power_fit(cut, Crash(CUT))
    killed = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)
    assert killed["global_step"] == CUT
    resumed = power_fit(cut, ckpt_path=cut / "ckpt" / "last.ckpt")
    return {"full": full, "cut": cut, "weights": recorder.weights,
            "resumed_folder": next(c for c in resumed.trainer.callbacks if isinstance(c, PowerEMA)).directory}


def stored_averages(checkpoint: dict) -> dict[float, dict[str, torch.Tensor]]:
    """sigma_rel -> weights: the evaluated 0.10 in the checkpoint's state_dict, 0.05 in the callback's state."""
    state = checkpoint["callbacks"]["PowerEMA"]
    assert state["sigma_rels"] == [0.05, 0.10] and state["evaluate_sigma_rel"] == 0.10
    names = state["averages"]["0.05"].keys()
    return {0.10: {n: checkpoint["state_dict"][n] for n in names}, 0.05: state["averages"]["0.05"]}


@pytest.mark.slow
def test_both_averages_are_the_power_function_averages_of_the_run(runs: dict) -> None:
    """Through the CLI with the overlay: after 8 steps (validations at 3 and 6 in between) the stored averages equal
    the direct profile-weighted sums of the recorded raw weights; snapshots at 2, 4, 6, 8."""
    checkpoint = torch.load(runs["full"] / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS and int(checkpoint["averaging_state"]["n_averaged"]) == STEPS
    weights = runs["weights"]
    assert len(weights) == STEPS
    for sigma_rel, average in stored_averages(checkpoint).items():
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert set(average) == set(weights[0])
        for name, value in average.items():
            expected = direct_average([w[name].flatten() for w in weights], gamma).view_as(value)
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
        assert any(not torch.equal(average[n], weights[-1][n]) for n in average)
    for name, value in weights[-1].items():
        assert torch.equal(checkpoint["current_model_state"][name], value)
    folder = next((runs["full"] / "lightning_logs").glob("version_*/power_ema"))
    assert sorted(snapshot_files(folder)) == [2, 4, 6, 8]
    assert yaml.safe_load((folder.parent / "hparams.yaml").read_text())["ema_sigma_rel"] == 0.10


@pytest.mark.slow
def test_resume_restores_both_averages_exactly(runs: dict) -> None:
    """Killed after step 4 and resumed (into a new version folder) to 8: both averages, the raw weights and every
    snapshot equal the uninterrupted run's bit for bit; the resumed run's folder holds the snapshots of steps 2 and 4
    of the killed run too."""
    full = torch.load(runs["full"] / "ckpt" / "last.ckpt", weights_only=True)
    resumed = torch.load(runs["cut"] / "ckpt" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == STEPS
    for sigma_rel, average in stored_averages(full).items():
        for name, value in average.items():
            assert torch.equal(stored_averages(resumed)[sigma_rel][name], value), (sigma_rel, name)
    for name, value in full["current_model_state"].items():
        assert torch.equal(resumed["current_model_state"][name], value), name
    full_folder = next((runs["full"] / "lightning_logs").glob("version_*/power_ema"))
    resumed_folder = runs["resumed_folder"]
    assert resumed_folder.parent.name == "version_1"
    assert sorted(snapshot_files(resumed_folder)) == [2, 4, 6, 8]
    for step, path in snapshot_files(full_folder).items():
        stored_step, averages = read_snapshot(path)
        again_step, again = read_snapshot(snapshot_files(resumed_folder)[step])
        assert stored_step == again_step == step
        for a, b in zip(averages, again):
            assert (a.sigma_rel, a.gamma) == (b.sigma_rel, b.gamma)
            assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights), step


@pytest.mark.slow
def test_resume_refuses_other_sigma_rels(runs: dict, tmp_path: Path) -> None:
    cli = tiny_cli(tmp_path, "--config", OVERLAY, f"--trainer.max_steps={STEPS}")
    set_callback(cli, PowerEMA, sigma_rels=(0.05, 0.2))
    with pytest.raises(ConfigError, match=r"tracks sigma_rels \[0.05, 0.1\].*this run \[0.05, 0.2\]"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=runs["cut"] / "ckpt" / "last.ckpt")


@pytest.mark.slow
def test_power_ema_beside_another_weight_averaging_is_refused(tmp_path: Path) -> None:
    cli = tiny_cli(tmp_path, "--trainer.max_steps=1")
    cli.trainer.callbacks.append(PowerEMA())
    with pytest.raises(ConfigError, match="PowerEMA and EMA both average the weights"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def run_command(*args: str | Path) -> int:
    """``diffusion-pl-ema ARGS`` in this process; its exit status (0 when it returns)."""
    try:
        posthoc_main([str(a) for a in args])
    except SystemExit as exit_:
        return int(exit_.code)
    return 0


@pytest.mark.slow
def test_command_writes_a_checkpoint_that_predict_loads(runs: dict, tmp_path: Path) -> None:
    """``diffusion-pl-ema`` on the resumed run: sigma_rel 0.10 (tracked) gives the live average; 0.07 another one;
    both are checkpoints that load_from_checkpoint and ``predict --ckpt_path`` take, checksummed, without training
    state."""
    snapshots, run_checkpoint = runs["resumed_folder"], runs["cut"] / "ckpt" / "last.ckpt"
    live = stored_averages(torch.load(run_checkpoint, weights_only=True))
    outputs = {s: tmp_path / f"ema_{s}.ckpt" for s in (0.10, 0.07)}
    for sigma_rel, output in outputs.items():
        assert run_command("--snapshots", snapshots, "--sigma-rel", sigma_rel, "--output", output,
                           "--checkpoint", run_checkpoint) == 0
        assert verify_checksum(output)
    tracked = DiffusionModule.load_from_checkpoint(outputs[0.10])
    between = DiffusionModule.load_from_checkpoint(outputs[0.07])
    for name, parameter in tracked.named_parameters():
        torch.testing.assert_close(parameter.detach(), live[0.10][name], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, tracked.state_dict()[n]) for n, p in between.state_dict().items())
    written = torch.load(outputs[0.07], weights_only=True)
    assert not set(written) & {"optimizer_states", "callbacks", "current_model_state", "loops"}
    assert written["posthoc_ema"]["sigma_rel"] == 0.07 and written["posthoc_ema"]["step"] == STEPS
    predictions = tmp_path / "predictions"
    cli = tiny_cli(tmp_path / "predict", "--data.init_args.predict.num=2", "--model.init_args.sampler.steps=2")
    set_callback(cli, SampleWriter, output_dir=str(predictions))
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=outputs[0.07], return_predictions=False)
    assert np.load(predictions / "samples.npz")["samples"].shape == (2, 8, 8, 1)


@pytest.mark.parametrize(("args", "says"), [
    (("--sigma-rel", "0.5"), "sigma_rel must be in (0, 0.2887)"),
    (("--sigma-rel", "wide"), "not a number: 'wide'"),
    (("--sigma-rel", "0.1"), "no power-EMA snapshots"),
])
def test_command_errors_exit_2_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture, args: tuple,
                                                says: str) -> None:
    assert run_command("--snapshots", tmp_path, "--output", tmp_path / "out.ckpt", *args) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.splitlines()) <= 4
    assert not (tmp_path / "out.ckpt").exists()


def test_command_keeps_the_run_checkpoint(synthetic_run: tuple[Path, dict], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    directory, _ = synthetic_run
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"training state")
    assert run_command("--snapshots", directory, "--sigma-rel", "0.08", "--output", checkpoint,
                       "--checkpoint", checkpoint) == 2
    assert "is the run's checkpoint" in capsys.readouterr().err and checkpoint.read_bytes() == b"training state"


def test_command_names_a_missing_run_checkpoint(synthetic_run: tuple[Path, dict], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    directory, _ = synthetic_run
    assert run_command("--snapshots", directory, "--sigma-rel", "0.08", "--output", tmp_path / "out.ckpt") == 2
    err = capsys.readouterr().err
    assert f"checkpoint of the run {directory.parent / 'checkpoints' / 'last.ckpt'} not found" in err
