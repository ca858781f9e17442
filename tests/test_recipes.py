"""Training recipes against closed forms: EDM's preconditioning and loss (Karras et al. 2022), the flow-matching
process and its velocity (Lipman et al. 2023; Liu et al. 2023), training-time distributions and weightings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from analytic import gaussian_denoiser
from torch import Tensor, nn

from diffusion_pl.core.checkpoint_file import read_checkpoint, write_checkpoint
from diffusion_pl.core.errors import CheckpointMismatchError
from diffusion_pl.core.spec import spec_of
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.loss_parts import EDMWeighting, LogitNormal, LogNormalSigma, MinSNR
from diffusion_pl.losses import SimpleLoss
from diffusion_pl.models import DiffusionModule
from diffusion_pl.nets import UNet
from diffusion_pl.nets.loading import MODULE_KEY
from diffusion_pl.parameterization import EDM, X0, Denoiser, Eps, V, Velocity
from diffusion_pl.processes import VESDE, VPSDE, DiscreteProcess, FlowProcess
from diffusion_pl.processes.noise_levels import edm_sigma, times_at_sigmas
from diffusion_pl.samplers import DDIM, ODE, DPMSolverPP, Euler, Heun, Uniform

pytestmark = pytest.mark.usefixtures("single_thread")


def test_edm_scalings_are_table_1() -> None:
    """c_skip, c_out, c_in, c_noise at sigma = 1 and 2 with sigma_data = 0.5, computed by hand from Table 1."""
    c_skip, c_out, c_in, c_noise = EDM(0.5).scalings(torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(c_skip, torch.tensor([0.25 / 1.25, 0.25 / 4.25], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.5 / math.sqrt(1.25), 1.0 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(1.25), 1 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.tensor([0.0, math.log(2.0) / 4], dtype=torch.float64))


def test_edm_on_a_vp_process_works_on_x_over_alpha() -> None:
    """On VP, the net sees c_in(sigma~) x_t / alpha at sigma~ = sigma / alpha (Karras et al. 2022, eq. 4)."""
    process, part = VPSDE(), EDM(0.5)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = torch.randn(3, 2)
    sigma = process.sigma(t) / process.alpha(t)
    expected = x_t / append_dims(process.alpha(t) * (sigma**2 + 0.25).sqrt(), 2)
    torch.testing.assert_close(part.net_input(x_t, t, process), expected)
    torch.testing.assert_close(part.net_time(t, process), sigma.log() / 4)


class ExactEDMNet(nn.Module):
    """F* = (D*(x~; sigma) - c_skip x~) / c_out for data N(mean, std^2), reading sigma~ from c_noise and x~ from the
    scaled input: the minimiser of EDM's loss, through the part's own input and time scalings."""

    def __init__(self, part: EDM, mean: float, std: float) -> None:
        super().__init__()
        self.part, self.mean, self.std = part, mean, std

    def forward(self, x_in: Tensor, c_noise: Tensor) -> Tensor:
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = self.part.scalings(sigma)
        x_tilde = x_in / append_dims(c_in, x_in.ndim)
        posterior_mean = self.mean + append_dims(self.std**2 / (self.std**2 + sigma**2), x_in.ndim) * (
            x_tilde - self.mean)
        return (posterior_mean - append_dims(c_skip, x_in.ndim) * x_tilde) / append_dims(c_out, x_in.ndim)


@pytest.mark.parametrize("process", [VESDE(0.002, 80.0), VPSDE()], ids=["ve", "vp"])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_loss_at_its_minimiser_is_the_closed_form(process, sigma_data: float) -> None:
    """With the exact F* of data N(0.3, 0.5^2), the denoiser returns the exact posterior mean D*(x; sigma), and
    the per-sample loss at each sigma is E||F* - target||^2 / D = Var[x0 | x~] / c_out^2
    = s^2 (sigma^2 + sigma_data^2) / ((s^2 + sigma^2) sigma_data^2): exactly 1 when sigma_data is the data's std."""
    mean, std = 0.3, 0.5
    part = EDM(sigma_data)
    denoiser = Denoiser(ExactEDMNet(part, mean, std), process, part)
    generator = torch.Generator().manual_seed(0)
    for sigma in (0.05, 0.5, 3.0):
        t = times_at_sigmas(process, torch.tensor([sigma], dtype=torch.float64)).float().expand(20_000)
        x0 = mean + std * torch.randn(20_000, 4, generator=generator)
        eps = torch.randn(20_000, 4, generator=generator)
        x_t = process.add_noise(x0, t, eps)
        prediction = denoiser(x_t, t)
        exact = gaussian_denoiser(torch.tensor(mean), torch.tensor(std), process)(x_t, t).x0
        torch.testing.assert_close(prediction.x0, exact, rtol=2e-4, atol=2e-4)
        target = part.target(x0, eps, t, process)
        loss = ((prediction.raw - target) ** 2).mean()
        closed_form = std**2 * (sigma**2 + sigma_data**2) / ((std**2 + sigma**2) * sigma_data**2)
        assert loss.item() == pytest.approx(closed_form, rel=0.03)


def test_edm_weighting_makes_the_preconditioned_error_unit_weight() -> None:
    """lambda(sigma) c_out^2 = 1 (Karras et al. 2022, Sec. 5), so SimpleLoss(EDMWeighting) with EDM() weighs F's
    squared error by one; with Eps() it weighs the eps error by lambda sigma^2 / alpha^2 (the x0 error carried over)."""
    process = VPSDE()
    t = torch.tensor([0.05, 0.3, 0.8])
    loss = SimpleLoss(EDMWeighting(0.5))
    torch.testing.assert_close(loss.weight(Denoiser(nn.Identity(), process, EDM(0.5)), t), torch.ones(3))
    sigma = process.sigma(t) / process.alpha(t)
    torch.testing.assert_close(loss.weight(Denoiser(nn.Identity(), process, Eps()), t),
                               (sigma**2 + 0.25) / (0.25 * sigma**2) * sigma**2)


def test_min_snr_part_equals_the_legacy_string() -> None:
    process = DiscreteProcess(1000, "linear")
    t = torch.tensor([1, 10, 500, 1000])
    for part in (Eps(), V()):
        denoiser = Denoiser(nn.Identity(), process, part)
        torch.testing.assert_close(SimpleLoss(MinSNR(5.0)).weight(denoiser, t), SimpleLoss("min_snr").weight(denoiser, t))


def test_log_normal_sigma_draws_edm_noise_levels() -> None:
    """ln sigma~ of the drawn times is N(-1.2, 1.2^2) (mean and std within Monte-Carlo error) on VE and VP."""
    for process in (VESDE(0.002, 80.0), VPSDE()):
        t = LogNormalSigma(-1.2, 1.2).sample(process, 40_000, "cpu", torch.Generator().manual_seed(1))
        log_sigma = edm_sigma(process, t).log()
        inside = log_sigma[(log_sigma > -5.5) & (log_sigma < 3.0)]  # away from the clamps at the process's ends
        assert inside.numel() > 39_000
        assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
        assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)


def test_logit_normal_times() -> None:
    """logit((t - t_min) / (t_max - t_min)) ~ N(0.5, 0.8^2) (Esser et al. 2024, eq. 19)."""
    process = FlowProcess()
    t = LogitNormal(0.5, 0.8).sample(process, 40_000, "cpu", torch.Generator().manual_seed(2))
    u = (t - process.t_min) / (process.t_max - process.t_min)
    logit = (u / (1 - u)).log()
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02) and logit.std().item() == pytest.approx(0.8, abs=0.02)


def test_flow_process_is_a_consistent_sde() -> None:
    """alpha = 1 - t, sigma = t, and the SDE's f, g reproduce the marginals: f = d log alpha / dt and
    g^2 = d sigma^2 / dt - 2 f sigma^2 (finite differences in float64)."""
    process = FlowProcess()
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    h = 1e-6
    x = torch.ones(4, 1, dtype=torch.float64)
    drift, g = process.sde(x, t)
    dlog_alpha = (process.alpha(t + h).log() - process.alpha(t - h).log()) / (2 * h)
    dsigma2 = (process.sigma(t + h) ** 2 - process.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(drift[:, 0], dlog_alpha)
    torch.testing.assert_close(g**2, dsigma2 - 2 * dlog_alpha * process.sigma(t) ** 2)
    assert process.t_max == pytest.approx(0.999)


class ExactVelocityNet(nn.Module):
    """u* = E[eps - x0 | x_t] for data N(mean, std^2) on the flow process (net time 999 t)."""

    def __init__(self, process: FlowProcess, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.exact = gaussian_denoiser(mean, std, process)

    def forward(self, x_t: Tensor, net_time: Tensor) -> Tensor:
        prediction = self.exact(x_t, net_time / 999.0)
        return prediction.eps - prediction.x0


MEAN, STD = torch.tensor([0.5, -0.3, 0.0]), torch.tensor([0.2, 0.5, 1.0])


@pytest.mark.parametrize("sampler", [ODE("heun", steps=100), Euler(100, spacing=Uniform()), Heun(40),
                                     DPMSolverPP(40)], ids=["ode-heun", "euler-uniform", "heun-karras", "dpmpp"])
def test_flow_with_the_exact_velocity_samples_the_data_law(sampler) -> None:
    """A Velocity() net with the exact u* of Gaussian data, sampled by the probability-flow ODE and by the fast
    solvers from the prior: mean and std per dimension within Monte-Carlo error of the data's."""
    process = FlowProcess()
    denoiser = Denoiser(ExactVelocityNet(process, MEAN, STD), process, Velocity())
    x_T = process.prior_sample((20_000, 3), generator=torch.Generator().manual_seed(3))
    samples = sampler.sample(denoiser.bind(), process, x_T)
    torch.testing.assert_close(samples.mean(0), MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(samples.std(0), STD, atol=0.03, rtol=0.03)


def test_velocity_target_is_the_interpolants_time_derivative() -> None:
    """On the flow process, d x_t / dt = eps - x0 = Velocity's target (finite difference of x_t)."""
    process = FlowProcess()
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.full((5,), 0.37, dtype=torch.float64)
    h = 1e-6
    derivative = (process.add_noise(x0, t + h, eps) - process.add_noise(x0, t - h, eps)) / (2 * h)
    torch.testing.assert_close(Velocity().target(x0, eps, t, process), derivative)


def legacy_checkpoint(tmp_path: Path, prediction: str) -> Path:
    """A DiffusionModule checkpoint as written before parameterization parts: ``prediction`` and
    ``learned_variance`` among the hyperparameters, no ``parameterization``."""
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=())
    module = DiffusionModule(net, DiscreteProcess(100, "cosine"), sampler=DDIM(steps=5), image_size=8, channels=1)
    hparams = dict(module.hparams)
    del hparams["parameterization"]
    hparams.update(prediction=prediction, learned_variance=False)
    path = tmp_path / f"legacy_{prediction}.ckpt"
    write_checkpoint({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                      "pytorch-lightning_version": "2.5.0", MODULE_KEY: "diffusion_pl.models.diffusion.DiffusionModule"},
                     path)
    return path


@pytest.mark.parametrize(("prediction", "part"), [("eps", Eps), ("v", V)])
def test_checkpoints_with_a_prediction_string_load_as_their_part(tmp_path: Path, prediction: str, part: type) -> None:
    """Earlier checkpoints (``prediction: eps|v``) load with their parameterization part, and the checkpoint check
    compares them in today's form: a config of the same part passes, one of another part is refused."""
    path = legacy_checkpoint(tmp_path, prediction)
    module = DiffusionModule.load_from_checkpoint(path)
    assert type(module.denoiser.parameterization) is part
    assert module.hparams["parameterization"] == spec_of(part())
    assert module.hparams["prediction"] is None and module.hparams["learned_variance"] is None
    stored = read_checkpoint(path)
    module.on_load_checkpoint(stored)  # same part: accepted
    other = DiffusionModule(module.denoiser.net, DiscreteProcess(100, "cosine"), sampler=DDIM(steps=5),
                            parameterization=X0(), image_size=8, channels=1)
    with pytest.raises(CheckpointMismatchError, match="parameterization"):
        other.on_load_checkpoint(read_checkpoint(path))


def test_prediction_string_and_part_together_are_refused() -> None:
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=())
    with pytest.raises(ValueError, match="not both"):
        DiffusionModule(net, DiscreteProcess(100, "cosine"), parameterization=V(), prediction="eps")
    legacy = DiffusionModule(net, DiscreteProcess(100, "cosine"), prediction="v", learned_variance=False)
    assert type(legacy.denoiser.parameterization) is V


def test_v_min_snr_overlay_changes_only_the_parameterization_and_weighting(tmp_path: Path) -> None:
    """overlays/v_min_snr.yaml on the demo: v-prediction with MinSNR(5) weighting, the demo's process and sampler."""
    from helpers import DDPM_FASHION, REPO, tiny_cli

    cli = tiny_cli(tmp_path, "--config", str(REPO / "overlays" / "v_min_snr.yaml"), config=DDPM_FASHION)
    assert type(cli.model.denoiser.parameterization) is V
    assert type(cli.model.loss_fn) is SimpleLoss and cli.model.loss_fn.times is None
    assert type(cli.model.loss_fn.weighting) is MinSNR and cli.model.loss_fn.weighting.gamma == 5.0
    assert type(cli.model.process) is DiscreteProcess and type(cli.model.sampler) is DDIM
