"""Latent diffusion (Rombach et al. 2022): the Autoencoder first stage and its scale, the frozen stage in training,
class tokens for cross-attention, and the latent configs end to end."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ddp_probe import write_callbacks_config
from helpers import (
    REPO,
    TINY_AUTOENCODER,
    LossRecorder,
    cli_process,
    last_checkpoint,
    predict_samples,
    run_trainer,
    sample_grid,
    tiny_args,
    write_autoencoder_checkpoint,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from diffusion_pl.callbacks import EMA, SampleWriter
from diffusion_pl.conditioning import ClassContext
from diffusion_pl.core.checkpoint_file import read_checkpoint
from diffusion_pl.core.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
)
from diffusion_pl.core.spec import Configurable
from diffusion_pl.data import Digits, ImageDataModule, ImageFormat, calibration_batches
from diffusion_pl.guidance import ClassifierFree
from diffusion_pl.models import DiffusionModule
from diffusion_pl.nets import UNet
from diffusion_pl.nets.autoencoder import DiagonalGaussian
from diffusion_pl.nets.first_stage import Autoencoder
from diffusion_pl.nets.unet import CrossAttention
from diffusion_pl.processes import DiscreteProcess
from diffusion_pl.samplers import DDIM

LDM = str(REPO / "configs" / "ldm" / "fashion_mnist.yaml")
LDM_CLASS = str(REPO / "configs" / "ldm" / "fashion_mnist_class_xattn.yaml")


class LinearAutoencoder(Configurable, nn.Module):
    """A linear KL "autoencoder": mu = gain * pixel_unshuffle(x, 2), a fixed posterior variance, and the exact
    inverse decoder x = pixel_shuffle(z / gain, 2)."""

    def __init__(self, gain: float = 3.0, posterior_var: float = 0.25) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))
        self.posterior_var = posterior_var

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean = self.gain * F.pixel_unshuffle(x, 2)
        return DiagonalGaussian(mean, torch.full_like(mean, math.log(self.posterior_var)))

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z / self.gain, 2)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        channels, height, width = image_shape
        return channels * 4, height // 2, width // 2


@pytest.fixture
def linear_checkpoint(tmp_path: Path) -> str:
    return str(write_autoencoder_checkpoint(LinearAutoencoder(), tmp_path / "linear_ae.ckpt"))


def test_decode_of_encode_is_the_identity_and_decoding_divides_by_the_scale(linear_checkpoint: str) -> None:
    stage = Autoencoder(linear_checkpoint, sample_posterior=False, scale=0.5)
    x = torch.randn(3, 1, 8, 8)
    z = stage.encode(x)
    torch.testing.assert_close(z, 0.5 * 3.0 * F.pixel_unshuffle(x, 2))
    torch.testing.assert_close(stage.decode(z), x)
    torch.testing.assert_close(stage.decode(z), F.pixel_shuffle(z / 0.5 / 3.0, 2))
    assert stage.latent_shape((1, 8, 8)) == (4, 4, 4)
    assert not stage.clips_to_data_range


def test_sampling_decodes_the_sampler_output_divided_by_the_scale(linear_checkpoint: str) -> None:
    torch.manual_seed(0)
    net = UNet(image_size=4, in_channels=4, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0)
    module = DiffusionModule(net, DiscreteProcess(50, "cosine"), sampler=DDIM(steps=5),
                             first_stage=Autoencoder(linear_checkpoint, scale=0.25), image_size=8, channels=1).eval()
    with torch.no_grad():
        for p in module.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noise = torch.randn(2, 4, 4, 4)
    images = module.sample(noise=noise, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = module.sampler.sample(module.sampling_denoiser(module.process, {}), module.process, noise,
                                        generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(images, F.pixel_shuffle(latents / 0.25 / 3.0, 2))
    assert latents.abs().max() > 1.0 / 0.25 / 3.0  # latents are not clamped to [-1, 1]


@pytest.mark.parametrize("prediction, warned", [("eps", True), ("v", False)])
def test_unclipped_eps_prediction_on_a_vanishing_alpha_is_warned_about(linear_checkpoint: str, prediction: str,
                                                                       warned: bool,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Cosine schedule, T = 1000: alpha(T) = 0.0016, so an unclipped eps model's x0 error is amplified ~600x."""
    net = UNet(image_size=4, in_channels=4, base_channels=16, channel_mult=(1, 2), attention_resolutions=())
    DiffusionModule(net, DiscreteProcess(1000, "cosine"), prediction=prediction,
                    first_stage=Autoencoder(linear_checkpoint, scale=1.0), image_size=8, channels=1)
    assert ("amplifies the net's error up to" in caplog.text) == warned


def test_scale_is_one_over_the_latent_std_with_the_posterior_variance_in_closed_form(linear_checkpoint: str) -> None:
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    mean = 3.0 * F.pixel_unshuffle(images, 2).double()
    for sample_posterior, posterior_var in ((True, 0.25), (False, 0.0)):
        stage = Autoencoder(linear_checkpoint, sample_posterior=sample_posterior)
        assert stage.calibration_images == 5000 and not stage.calibrated
        stage.calibrate(images.split(7), reduce_sum=lambda sums: sums)
        expected = 1.0 / math.sqrt(mean.var(unbiased=False).item() + posterior_var)
        assert stage.scale.item() == pytest.approx(expected, rel=1e-6)
        assert stage.calibrated and stage.calibration_images == 0
    # the sampled latents of the estimate have unit standard deviation
    stage = Autoencoder(linear_checkpoint)
    stage.calibrate([images], reduce_sum=lambda sums: sums)
    torch.manual_seed(0)
    latents = torch.cat([stage.encode(images) for _ in range(50)])
    assert latents.std().item() == pytest.approx(1.0, abs=0.01)
    # outside training the encoding is the posterior mean
    stage.eval()
    torch.testing.assert_close(stage.encode(images), stage.scale * mean.float())


def test_latent_mask_keeps_only_blocks_known_in_every_pixel(linear_checkpoint: str) -> None:
    stage = Autoencoder(linear_checkpoint, scale=1.0)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :5] = 1.0  # columns 0-4 known: latent columns 0, 1 fully known, column 2 half known
    latent = stage.latent_mask(mask, (1, 8, 8))
    assert latent.shape == (1, 4, 4, 4)
    expected = torch.zeros(4, 4)
    expected[:, :2] = 1.0
    assert torch.equal(latent[0], expected.expand(4, 4, 4))


def test_scale_errors(linear_checkpoint: str, tmp_path: Path) -> None:
    stage = Autoencoder(linear_checkpoint)
    with pytest.raises(RuntimeError, match="not known yet"):
        stage.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="positive"):
        Autoencoder(linear_checkpoint, scale=-1.0)
    with pytest.raises(CheckpointNotFoundError, match="autoencoder_fashion_mnist.yaml"):
        Autoencoder(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="training_image_batches"):
        calibration_batches(object(), 10)


def test_calibration_images_are_split_over_ranks_and_cover_the_first_n() -> None:
    """Every process takes every world-size-th image: the ranks' shares together are the first N images once."""
    data = ImageDataModule(Digits(), ImageFormat(image_size=8, channels=1, resize_mode="resize"), batch_size=16)
    data.setup("fit")
    single = torch.cat(list(data.training_image_batches(100)))
    shares = []
    for rank in range(3):
        data.trainer = SimpleNamespace(world_size=3, global_rank=rank)  # a trainer with 3 processes
        shares.append(torch.cat(list(data.training_image_batches(100))))
    assert single.shape[0] == 100 and sum(s.shape[0] for s in shares) == 100
    merged = torch.empty_like(single)
    for rank, share in enumerate(shares):
        merged[rank::3] = share
    assert torch.equal(merged, single)


def test_cross_attention_weights_sum_to_one_over_the_context() -> None:
    """Identical tokens give the output of one token, whatever the queries and the number of tokens: the softmax
    weights over the context are a convex combination."""
    torch.manual_seed(0)
    attention = CrossAttention(dim=8, context_dim=5, num_heads=2)
    x, token = torch.randn(2, 6, 8), torch.randn(2, 1, 5)
    one = attention(x, token)
    torch.testing.assert_close(attention(x, token.expand(2, 7, 5)), one)
    assert not torch.allclose(attention(x, torch.cat([token, torch.randn(2, 3, 5)], dim=1)), one)


def test_class_context_tokens_null_row_and_dropout() -> None:
    torch.manual_seed(0)
    part = ClassContext(num_classes=3, dim=6, dropout=0.5)
    labels = torch.tensor([0, 1, 2, 1] * 500)
    cond = part({"label": labels}, training=False)
    assert cond["context"].shape == (2000, 1, 6)
    torch.testing.assert_close(cond["context"][:, 0], part.embedding.weight[labels])
    null = part.null(cond)["context"]
    assert torch.equal(null[:, 0], part.embedding.weight[3].expand(2000, 6))
    dropped = part({"label": labels}, training=True)["context"]
    share = (dropped == null).all(dim=-1).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.04)
    with pytest.raises(ValueError, match="context_dim: 6"):
        part.check_net(UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                            attention_resolutions=(4,), context_dim=5))
    with pytest.raises(ValueError, match="num_classes: null"):
        part.check_net(UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                            attention_resolutions=(4,), context_dim=6, num_classes=3))


def test_class_context_guidance_combines_the_token_and_the_null_token() -> None:
    """CFG through cross-attention (Ho & Salimans 2022, eq. 6): (1 + w) eps(x_t, tau(y)) - w eps(x_t, tau(null))."""
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,),
               context_dim=6, cross_attention_resolutions=(8, 4), dropout=0.0)
    for p in net.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    module = DiffusionModule(net, DiscreteProcess(50, "cosine"), conditioner=ClassContext(3, 6),
                             guidance=[ClassifierFree(3.0)], image_size=8, channels=1, clip_samples=False).eval()
    batch, x, t = {"label": torch.tensor([0, 2])}, torch.randn(2, 1, 8, 8), torch.tensor([10, 30])
    with torch.no_grad():
        cond = module.conditioner(batch, training=False)
        conditional = module.denoiser.bind(**cond)(x, t).eps
        unconditional = module.denoiser.bind(**module.conditioner.null(cond))(x, t).eps
        assert not torch.allclose(conditional, unconditional)
        guided = module.sampling_denoiser(module.process, batch)(x, t).eps
    torch.testing.assert_close(guided, 4.0 * conditional - 3.0 * unconditional, rtol=1e-5, atol=1e-5)


# Tiny latent fits (run_trainer) validate on one batch and log every step, with sample grids every 2 steps
# (settings=sample_grid(2)) and a checkpoint every step into ``root/ckpt`` (prepend=[ModelCheckpoint(...)]).
LATENT_FIT = ["--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_first_stage_is_frozen_shared_with_the_ema_and_outside_the_optimizer(tmp_path: Path) -> None:
    cli = run_trainer("fit", LDM, *LATENT_FIT, "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                      root=tmp_path, settings=sample_grid(2),
                      prepend=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)])
    model, trainer = cli.model, cli.trainer
    stage = model.first_stage
    before = read_checkpoint(TINY_AUTOENCODER, weights_only=True)["state_dict"]
    after = {f"autoencoder.{k}": v for k, v in stage.autoencoder.state_dict().items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in stage.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not optimized & {id(p) for p in stage.parameters()}
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    assert ema.averaged_module.first_stage is stage  # shared, not copied
    assert ema.averaged_module.denoiser is not model.denoiser
    last = read_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["state_dict"]["first_stage.scale"].item() == pytest.approx(stage.scale.item())
    assert stage.scale.item() > 0
    grids = list(tmp_path.rglob("*.png"))
    assert grids, "the sample grid is decoded to pixels and written"


@pytest.mark.slow
def test_latent_diffusion_resumes_exactly(tmp_path: Path) -> None:
    args = ("--trainer.max_steps=8", "--trainer.val_check_interval=4", "--data.init_args.random_flip=true")
    full, resumed = LossRecorder(), LossRecorder()
    run_trainer("fit", LDM, *LATENT_FIT, *args, root=tmp_path / "full", settings=sample_grid(2), callbacks=[full],
                prepend=[ModelCheckpoint(dirpath=tmp_path / "full" / "ckpt", every_n_train_steps=1, save_last=True)])
    run_trainer("fit", LDM, *LATENT_FIT, "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                "--data.init_args.random_flip=true", root=tmp_path / "cut", settings=sample_grid(2),
                prepend=[ModelCheckpoint(dirpath=tmp_path / "cut" / "ckpt", every_n_train_steps=1, save_last=True)])
    last = str(tmp_path / "cut" / "ckpt" / "last.ckpt")
    run_trainer("fit", LDM, *LATENT_FIT, *args, root=tmp_path / "cut", ckpt_path=last, settings=sample_grid(2),
                callbacks=[resumed],
                prepend=[ModelCheckpoint(dirpath=tmp_path / "cut" / "ckpt", every_n_train_steps=1, save_last=True)])
    assert sorted(resumed.losses) == list(range(5, 9))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], rel=1e-6, abs=1e-7), f"loss differs at step {step}"


@pytest.mark.slow
def test_scale_of_two_gloo_processes_equals_that_of_one(tmp_path: Path) -> None:
    scales = {}
    for name, extra in (("one", ["--trainer.devices=1"]), ("two", ["--trainer.devices=2", "--trainer.strategy=ddp"])):
        root = tmp_path / name
        root.mkdir(parents=True)
        callbacks = write_callbacks_config(root / "callbacks.yaml", every_n_steps=1)
        cli_process("fit", *tiny_args(root, config=LDM), "--config", str(callbacks), "--trainer.max_steps=1",
                    "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", *extra)
        checkpoint = read_checkpoint(last_checkpoint(root), weights_only=True)
        scales[name] = checkpoint["state_dict"]["first_stage.scale"].item()
    assert scales["two"] == pytest.approx(scales["one"], rel=1e-9)


@pytest.mark.slow
def test_class_conditional_latent_model_predicts_decoded_images_with_its_stored_scale(tmp_path: Path) -> None:
    trained = run_trainer("fit", LDM_CLASS, *LATENT_FIT, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                          root=tmp_path / "train", settings=sample_grid(2),
                          prepend=[ModelCheckpoint(dirpath=tmp_path / "train" / "ckpt", every_n_train_steps=1,
                                                   save_last=True)])
    scale = trained.model.first_stage.scale.item()
    cli = run_trainer("predict", LDM_CLASS, "--data.init_args.predict.num=6",
                      "--data.init_args.predict.labels=[3,5]", "--model.init_args.sampler.steps=5",
                      root=tmp_path / "predict", ckpt_path=tmp_path / "train" / "ckpt" / "last.ckpt",
                      settings={SampleWriter: {"output_dir": str(tmp_path / "out")}})
    assert cli.model.first_stage.scale.item() == scale > 0  # from the checkpoint; predict estimates nothing
    written = np.load(tmp_path / "out" / "samples.npz")
    assert written["samples"].shape == (6, 8, 8, 1) and written["samples"].dtype == np.uint8  # decoded to pixels
    assert written["labels"].tolist() == [3, 5, 3, 5, 3, 5]


def test_a_latent_checkpoint_predicts_on_its_own(tmp_path: Path) -> None:
    """The diffusion checkpoint holds the autoencoder's weights and architecture: predict gives the same images when
    the autoencoder path is spelled differently, when the fit-only calibration_images differs, and when the
    autoencoder file is gone (issue 24, part 5). A different scale is still a different model."""
    autoencoder = tmp_path / "ae" / "autoencoder.ckpt"
    autoencoder.parent.mkdir()
    shutil.copy(TINY_AUTOENCODER, autoencoder)
    stage = f"--model.init_args.first_stage.init_args.checkpoint={autoencoder}"
    run_trainer("fit", LDM, *LATENT_FIT, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", stage,
                root=tmp_path / "train", settings=sample_grid(2),
                prepend=[ModelCheckpoint(dirpath=tmp_path / "train" / "ckpt", every_n_train_steps=1, save_last=True)])
    ckpt = tmp_path / "train" / "ckpt" / "last.ckpt"
    predict = ["--data.init_args.predict.num=3", "--model.init_args.sampler.steps=3"]

    reference = predict_samples(LDM, *predict, stage, root=tmp_path / "same", ckpt_path=ckpt)["samples"]
    respelled = f"--model.init_args.first_stage.init_args.checkpoint={tmp_path / 'ae' / '.' / 'autoencoder.ckpt'}"
    np.testing.assert_array_equal(
        predict_samples(LDM, *predict, respelled, "--model.init_args.first_stage.init_args.calibration_images=7",
                        root=tmp_path / "respelled", ckpt_path=ckpt)["samples"], reference)
    autoencoder.unlink()
    np.testing.assert_array_equal(predict_samples(LDM, *predict, stage, root=tmp_path / "gone", ckpt_path=ckpt)["samples"],
                                  reference)
    with pytest.raises(CheckpointMismatchError, match="scale"):
        predict_samples(LDM, *predict, stage, "--model.init_args.first_stage.init_args.scale=0.5",
                        root=tmp_path / "rescaled", ckpt_path=ckpt)
