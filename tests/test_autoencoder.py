"""The KL autoencoder of latent diffusion: posterior math, shapes, the adversarial schedule, exact resume with manual
optimisation, checkpoints (EMA, rebuild, reload) and the fit config."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import REPO, run_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributions import Normal, kl_divergence

from diffusion_pl.callbacks import EMA, ReconstructionGrid, ResumeRNGState
from diffusion_pl.data import Digits, ImageDataModule, ImageFormat
from diffusion_pl.metrics.super_resolution import psnr
from diffusion_pl.models import AutoencoderModule, WarmupLR
from diffusion_pl.models.autoencoder import autoencoder_steps
from diffusion_pl.nets import DiagonalGaussian, KLAutoencoder, PatchDiscriminator
from diffusion_pl.nets.autoencoder import adaptive_weight, discriminator_loss
from diffusion_pl.nets.loading import load_checkpoint, rebuild

AE_CONFIG = str(REPO / "configs" / "ldm" / "autoencoder_fashion_mnist.yaml")


def tiny_net() -> KLAutoencoder:
    return KLAutoencoder(in_channels=1, latent_channels=4, base_channels=8, channel_mult=(1, 2), attention=True)


def tiny_module(discriminator: bool = False, **kwargs: Any) -> AutoencoderModule:
    disc = PatchDiscriminator(in_channels=1, base_channels=8, num_layers=1) if discriminator else None
    return AutoencoderModule(tiny_net(), disc, optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9)),
                             image_size=8, channels=1, **kwargs)


def digits_data() -> ImageDataModule:
    return ImageDataModule(Digits(), ImageFormat(image_size=8, channels=1, resize_mode="resize"), batch_size=32,
                           val_fraction=0.1)


def trainer(root: Path, callbacks: list[pl.Callback] | None = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, logger=False, callbacks=callbacks or [],
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []), **kwargs)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------- posterior and shapes


def test_kl_matches_closed_form_of_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=generator), 2 * torch.randn(3, 4, 5, 5, generator=generator)
    posterior = DiagonalGaussian(mean, logvar)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected)
    assert posterior.kl().shape == (3,)
    assert torch.all(DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 3)).kl() == 0)  # the prior itself


def test_sample_has_the_posterior_mean_and_std() -> None:
    n = 200_000
    mean, logvar = torch.full((n,), 1.5), torch.full((n,), math.log(0.25))  # sigma = 0.5
    posterior = DiagonalGaussian(mean, logvar)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert abs(float(z.mean()) - 1.5) < 5 * 0.5 / math.sqrt(n)
    assert abs(float(z.std()) - 0.5) < 0.01
    torch.testing.assert_close(posterior.std, torch.full((n,), 0.5))
    torch.testing.assert_close(posterior.var, torch.full((n,), 0.25))
    assert torch.equal(posterior.mode(), mean)
    again = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    clamped = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[-100.0, 100.0]]))
    assert clamped.logvar.tolist() == [[-30.0, 20.0]] and torch.isfinite(clamped.kl()).all()


def test_shapes_factor_and_latent_shape_errors() -> None:
    net = KLAutoencoder(in_channels=3, latent_channels=4, base_channels=8, channel_mult=(1, 2, 2, 4))
    assert net.factor == 8 and net.latent_channels == 4
    x = torch.randn(2, 3, 32, 24)
    reconstruction, posterior = net(x)
    assert reconstruction.shape == x.shape
    assert posterior.mean.shape == (2, 4, 4, 3) == (2, *net.latent_shape((3, 32, 24)))
    assert net.decode(net.encode(x).mode()).shape == x.shape
    with pytest.raises(ValueError, match="divisible by 8.*image_size"):
        net.latent_shape((3, 36, 32))
    with pytest.raises(ValueError, match="3-channel.*data.init_args.image_format.channels"):
        net.latent_shape((1, 32, 32))
    logits = PatchDiscriminator(in_channels=3, base_channels=8, num_layers=3)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 2, 2)


def test_module_refuses_mismatched_data() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        AutoencoderModule(tiny_net(), image_size=8, channels=3)
    with pytest.raises(ValueError, match="image_size"):
        AutoencoderModule(tiny_net(), image_size=9, channels=1)
    with pytest.raises(ValueError, match="trainer.gradient_clip_val"):
        AutoencoderModule(tiny_net(), image_size=8, channels=1, gradient_clip_val=1.0)


def test_psnr_of_perfect_and_known_reconstructions() -> None:
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    perfect = psnr(x, x)
    assert torch.isfinite(perfect).all() and (perfect > 200).all()  # MSE floored at 1e-20, not inf
    # A 0.1 error on [-1, 1] is 0.05 on [0, 1]: 10 log10(1 / 0.05^2) = 26.02 dB.
    x = torch.rand(2, 1, 8, 8) * 1.8 - 0.9
    torch.testing.assert_close(psnr(x + 0.1, x),
                               torch.full((2,), 10 * math.log10(1 / 0.05**2), dtype=torch.float64))


# ------------------------------------------------------------------------------------------- adversarial term


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    last = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    weight = adaptive_weight((a * last).sum(), (b * last).sum(), last)  # gradients a and b
    torch.testing.assert_close(weight, a.norm() / (b.norm() + 1e-4))
    assert not weight.requires_grad
    assert float(adaptive_weight((a * last).sum(), (0 * last).sum(), last)) == 1e4  # clamped


def test_discriminator_losses_closed_form() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(0.5 * (0.25 + 0.75))
    vanilla = 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-2))
                     + math.log1p(math.exp(0.5))) / 2
    assert float(discriminator_loss(real, fake, "vanilla")) == pytest.approx(vanilla)


def test_step_counting() -> None:
    assert [autoencoder_steps(g, 3) for g in (0, 2, 3, 5, 7)] == [0, 2, 3, 4, 5]
    assert [autoencoder_steps(g, 0) for g in (0, 2, 4)] == [0, 1, 2]


def test_discriminator_is_off_before_disc_start(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = tiny_module(discriminator=True, disc_start=3, kl_weight=1e-3)
    before = weights(module.discriminator)
    fit = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    fit.fit(module, datamodule=digits_data())
    assert fit.global_step == 3 and module.autoencoder_steps == 3
    assert all(torch.equal(before[k], v) for k, v in module.discriminator.state_dict().items())
    metrics = fit.callback_metrics
    assert "train/g_loss" not in metrics and "train/d_loss" not in metrics
    torch.testing.assert_close(metrics["train/loss"], metrics["train/rec_loss"] + 1e-3 * metrics["train/kl"])

    fit = trainer(tmp_path, max_steps=7, limit_val_batches=0)  # two more batches, both optimizers
    fit.fit(module, datamodule=digits_data())
    assert module.autoencoder_steps == 5
    assert any(not torch.equal(before[k], v) for k, v in module.discriminator.state_dict().items())
    metrics = fit.callback_metrics
    assert {"train/g_loss", "train/d_loss", "train/disc_weight"} <= set(metrics)
    expected = (metrics["train/rec_loss"] + 1e-3 * metrics["train/kl"]
                + metrics["train/disc_weight"] * metrics["train/g_loss"])
    torch.testing.assert_close(metrics["train/loss"], expected)


def test_exact_resume_with_the_discriminator_switched_on_mid_run(tmp_path: Path) -> None:
    """Two epochs of 3 batches in one go vs. one epoch + resume: the discriminator starts at the 3rd batch, the
    schedules warm up, gradients are clipped, EMA averages; all weights and optimizer states end equal."""

    def run(root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[AutoencoderModule, pl.Trainer]:
        pl.seed_everything(0)
        module = AutoencoderModule(tiny_net(), PatchDiscriminator(1, 8, 1), disc_start=2, image_size=8, channels=1,
                                   lr_scheduler=functools.partial(WarmupLR, warmup_steps=4), gradient_clip_val=0.05)
        fit = trainer(root, [ModelCheckpoint(dirpath=root / "ckpt", save_last=True), EMA(decay=0.9),
                             ResumeRNGState()], max_epochs=epochs, limit_train_batches=3, limit_val_batches=0)
        fit.fit(module, datamodule=digits_data(), ckpt_path=ckpt_path)
        return module, fit

    full, full_trainer = run(tmp_path / "full", 2)
    run(tmp_path / "cut", 1)
    resumed, resumed_trainer = run(tmp_path / "cut", 2, str(tmp_path / "cut" / "ckpt" / "last.ckpt"))
    assert full_trainer.global_step == resumed_trainer.global_step == 2 + 2 * 4  # 2 batches alone, 4 with D
    assert full.autoencoder_steps == 6
    for name, value in weights(full).items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    for optimizer, other in zip(full_trainer.optimizers, resumed_trainer.optimizers):
        assert optimizer.param_groups[0]["lr"] == other.param_groups[0]["lr"]
        for state, other_state in zip(optimizer.state.values(), other.state.values()):
            assert torch.equal(state["exp_avg"], other_state["exp_avg"])
    assert full_trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3)  # 4 of 4 warm-up steps done


# ------------------------------------------------------------------------------------------- checkpoints and CLI


def test_ema_checkpoint_rebuild_and_reload(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = tiny_module()
    fit = trainer(tmp_path, [EMA(decay=0.5), ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_steps=4,
                  limit_val_batches=0)
    fit.fit(module, datamodule=digits_data())
    path = tmp_path / "last.ckpt"
    checkpoint = load_checkpoint(path)
    assert checkpoint["hyper_parameters"]["discriminator"] is None
    net = rebuild(checkpoint, "net", "autoencoder.", str(path))
    assert isinstance(net, KLAutoencoder) and not net.training
    averaged = {k[len("autoencoder."):]: v for k, v in checkpoint["state_dict"].items()}
    raw = {k[len("autoencoder."):]: v for k, v in checkpoint["current_model_state"].items()}
    assert all(torch.equal(v, averaged[k]) for k, v in net.state_dict().items())  # the EMA weights
    assert any(not torch.equal(v, raw[k]) for k, v in net.state_dict().items() if v.is_floating_point())

    reloaded = AutoencoderModule.load_from_checkpoint(path).eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(reloaded.reconstruct(x), net(x, sample_posterior=False)[0])
    assert reloaded.hparams.kl_weight == module.hparams.kl_weight


def test_fit_through_the_config_logs_reconstruction_metrics_and_grids(tmp_path: Path) -> None:
    cli = run_cli("fit", AE_CONFIG, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                  "--trainer.limit_val_batches=2", "--data.init_args.num_workers=0", root=tmp_path)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4 and isinstance(cli.model, AutoencoderModule)
    assert 5 < float(metrics["val/ae_psnr"]) < 100 and 0 < float(metrics["val/ae_l1"]) < 2
    assert {"val/kl", "val/loss", "train/loss", "train/rec_loss", "train/kl"} <= set(metrics)
    grid = next(c for c in cli.trainer.callbacks if isinstance(c, ReconstructionGrid))
    assert grid.last_path is not None and grid.last_path.is_file()
    events = list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
    assert events and any(b"val/ae_psnr" in event.read_bytes() for event in events)
