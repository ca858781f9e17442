"""Cascaded diffusion: the low-res condition with noise augmentation against its closed form, the SR metrics, the
cascade pipeline and super-resolution from files through ``predict`` (tiny nets, 8x8 digits)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_DATA, last_checkpoint, predict_samples, read_samples, relocatable_text, run_cli
from torch import Tensor

from diffusion_pl.conditioning import (
    ClassLabel,
    Compose,
    LowResImage,
    MissingLowResError,
)
from diffusion_pl.core.resize import downsample, upsample
from diffusion_pl.data import Digits, ImageDataModule, ImageFormat
from diffusion_pl.guidance import ClassifierFree
from diffusion_pl.metrics import consistency_error, psnr, ssim
from diffusion_pl.models import DiffusionModule
from diffusion_pl.nets import UNet
from diffusion_pl.processes import VESDE, VPSDE, DiscreteProcess
from diffusion_pl.samplers import DDIM

BASE = str(REPO / "configs" / "cascade" / "fashion_mnist_base16.yaml")
SR = str(REPO / "configs" / "cascade" / "fashion_mnist_sr16to32.yaml")
CASCADE = str(REPO / "configs" / "cascade" / "fashion_mnist_cascade.yaml")


def block_mean(x: Tensor, factor: int) -> Tensor:
    """Each factor x factor block's mean, by reshaping (independent of avg_pool)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


def vp_alpha(t: float, beta_min: float = 0.1, beta_max: float = 20.0) -> float:
    """The VP SDE's alpha(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2) (Song et al. 2021, eq. 33)."""
    return math.exp(-0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min)


def sr_net(**kwargs: object) -> UNet:
    options = dict(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), dropout=0.0, cond_channels=1, cond_level_embedding=True)
    options.update(kwargs)
    return UNet(**options)


# ------------------------------------------------------------------------------------------- the condition


def test_training_levels_are_uniform_on_zero_to_max_level() -> None:
    conditioner = LowResImage(factor=2, max_level=0.4)
    torch.manual_seed(0)
    levels = conditioner.levels(20000, torch.device("cpu"), training=True, generator=None).sort().values
    cdf = torch.arange(1, 20001) / 20000
    assert float(levels.min()) >= 0 and float(levels.max()) <= 0.4
    assert float((cdf - levels / 0.4).abs().max()) < 0.015  # Kolmogorov-Smirnov distance to U[0, 0.4]
    fixed = conditioner.levels(5, torch.device("cpu"), training=False, generator=None)
    assert torch.equal(fixed, torch.full((5,), 0.2))


def test_sampling_condition_is_the_closed_form_for_the_given_noise() -> None:
    conditioner = LowResImage(factor=2, sampling_level=0.3, upsample_mode="nearest")
    image = torch.rand(3, 1, 8, 8) * 2 - 1
    out = conditioner({"image": image}, training=False, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    up = block_mean(image, 2).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    alpha = vp_alpha(0.3)
    expected = alpha * up + math.sqrt(1 - alpha**2) * eps
    torch.testing.assert_close(out["cond"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cond_level"], torch.full((3,), 999 * 0.3))


def test_level_zero_passes_the_low_res_image_unchanged_and_low_res_wins_over_image() -> None:
    conditioner = LowResImage(factor=2, max_level=0.0, sampling_level=0.0)
    low = torch.rand(2, 1, 4, 4)
    out = conditioner({"low_res": low, "image": torch.zeros(2, 1, 8, 8)}, training=True)
    torch.testing.assert_close(out["cond"], upsample(low, 8, "bilinear"))
    torch.testing.assert_close(downsample(out["cond"], 2), block_mean(out["cond"], 2))


def test_sampling_noise_comes_from_each_items_seed() -> None:
    conditioner = LowResImage(factor=2, sampling_level=0.5)
    low = torch.zeros(3, 1, 4, 4)
    both = conditioner({"low_res": low, "seed": torch.tensor([7, 8, 9])}, training=False)["cond"]
    alone = conditioner({"low_res": low[1:2], "seed": torch.tensor([8])}, training=False)["cond"]
    torch.testing.assert_close(both[1:2], alone)
    assert not torch.allclose(both[0], both[1])


def test_dropout_zeroes_the_condition_at_its_rate_only_while_training() -> None:
    conditioner = LowResImage(factor=2, dropout=0.3)
    low = torch.ones(4000, 1, 2, 2)
    torch.manual_seed(1)
    cond = conditioner({"low_res": low}, training=True)["cond"]
    dropped = (cond.flatten(1) == 0).all(1).float().mean()
    assert abs(float(dropped) - 0.3) < 0.03
    cond = conditioner({"low_res": low}, training=False)["cond"]
    assert not (cond.flatten(1) == 0).all(1).any()


def test_bad_settings_and_missing_inputs_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="untouched at level 0"):
        LowResImage(process=VESDE())
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        LowResImage(sampling_level=1.5)
    with pytest.raises(MissingLowResError, match="low-res input"):
        LowResImage()({"label": torch.zeros(2)}, training=False)
    with pytest.raises(MissingLowResError, match="real images"):
        LowResImage().example_batch(4, "cpu")


def test_a_stage_without_cond_or_cond_level_is_refused_naming_the_conditioner() -> None:
    for net in (sr_net(cond_channels=0), sr_net(cond_level_embedding=False)):
        with pytest.raises(ValueError, match="LowResImage.*cond_channels"):
            DiffusionModule(net=net, process=DiscreteProcess(num_steps=10, schedule="cosine"), conditioner=LowResImage(factor=2),
                            image_size=8, channels=1)


def test_the_net_receives_cond_and_cond_level_in_training() -> None:
    net, seen = sr_net(), {}
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    model = DiffusionModule(net=net, process=DiscreteProcess(num_steps=10, schedule="cosine"),
                            conditioner=LowResImage(factor=2), image_size=8, channels=1)
    image = torch.rand(6, 1, 8, 8) * 2 - 1
    model.loss_fn(model.denoiser, image, **model.condition({"image": image}))
    assert set(seen) == {"cond", "cond_level"}
    assert seen["cond"].shape == (6, 1, 8, 8)
    assert 0 <= float(seen["cond_level"].min()) and float(seen["cond_level"].max()) <= 999 * 0.5


def test_classifier_free_guidance_at_the_conditional_weight_is_the_conditional_prediction() -> None:
    """The issue's eps = w eps(x, x_low) + (1 - w) eps(x) at w = 1; in the framework's (1 + s) eps_c - s eps_u, s = 0."""
    torch.manual_seed(0)
    kwargs = dict(net=sr_net(), process=DiscreteProcess(num_steps=10, schedule="cosine"), image_size=8, channels=1, clip_samples=False,
                  conditioner=LowResImage(factor=2, dropout=0.1))
    plain, guided = DiffusionModule(**kwargs), DiffusionModule(**kwargs, guidance=[ClassifierFree(scale=0.0)])
    guided.load_state_dict(plain.state_dict())
    for layer in plain.denoiser.net.out[-1], guided.denoiser.net.out[-1]:  # make the output depend on the input
        torch.nn.init.normal_(layer.weight, std=0.1)
    guided.load_state_dict(plain.state_dict())
    batch = {"low_res": torch.rand(4, 1, 4, 4), "seed": torch.arange(4)}
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 5)
    expected = plain.sampling_denoiser(plain.process, batch)(x, t).eps
    torch.testing.assert_close(guided.sampling_denoiser(guided.process, batch)(x, t).eps, expected,
                               atol=1e-5, rtol=1e-5)
    sharper = DiffusionModule(**kwargs, guidance=[ClassifierFree(scale=2.0)])
    sharper.load_state_dict(plain.state_dict())
    assert not torch.allclose(sharper.sampling_denoiser(sharper.process, batch)(x, t).eps, expected)


def test_compose_passes_real_images_to_the_low_res_part() -> None:
    conditioner = Compose([LowResImage(factor=2), ClassLabel(3)])
    real = torch.rand(2, 1, 8, 8)
    batch = conditioner.example_batch(5, "cpu", real)
    assert batch["label"].tolist() == [0, 1, 2, 0, 1]
    torch.testing.assert_close(batch["low_res"], block_mean(real[[0, 1, 0, 1, 0]], 2))


# ------------------------------------------------------------------------------------------- metrics and data


def test_sr_metrics_against_closed_forms() -> None:
    target = torch.zeros(2, 1, 8, 8)
    image = torch.full((2, 1, 8, 8), 0.2)
    torch.testing.assert_close(psnr(image, target), torch.full((2,), 10 * math.log10(4 / 0.04), dtype=torch.float64))
    torch.testing.assert_close(ssim(target + 0.5, target + 0.5), torch.ones(2, dtype=torch.float64))
    low = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(consistency_error(upsample(low, 8, "nearest"), low, 2),
                               torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(consistency_error(upsample(low, 8, "nearest") + 0.1, low, 2),
                               torch.full((2,), 0.1, dtype=torch.float64))


def test_downsampled_data_is_the_block_mean_of_the_full_size_data() -> None:
    full = ImageDataModule(Digits(), ImageFormat(image_size=8, channels=1, resize_mode="resize"), val_fraction=0.0)
    low = ImageDataModule(Digits(), ImageFormat(image_size=4, downsample=2, channels=1, resize_mode="resize"),
                          val_fraction=0.0)
    expected = block_mean(full.load("train").images.double(), 2).round().to(torch.uint8)
    assert torch.equal(low.load("train").images, expected)


# ------------------------------------------------------------------------------------------- end to end


# A tiny stage: 2 steps, validated at the second; a 4x4 base stage (the 8x8 data downsampled) has no attention.
STAGE_FIT = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
             "--model.init_args.sampler.init_args.steps=4"]
BASE_4X4 = ["--data.init_args.image_format.image_size=4", "--data.init_args.image_format.downsample=2",
            "--model.init_args.net.init_args.attention_resolutions=[]"]
# A cascade config (its trained stages' own nets) predicts on the tiny data: no tiny-net overrides (tiny=False).
CASCADE_PREDICT = [*TINY_DATA, "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stages")
    run_cli("fit", BASE, *STAGE_FIT, *BASE_4X4, root=root / "base")
    run_cli("fit", SR, *STAGE_FIT, root=root / "sr")
    return last_checkpoint(root / "base"), last_checkpoint(root / "sr")


def cascade_config(path: Path, base: Path, sr: Path) -> str:
    text = (relocatable_text(CASCADE).replace("runs/cascade_base16/lightning_logs/version_0/checkpoints/last.ckpt",
                                              str(base))
            .replace("runs/cascade_sr16to32/lightning_logs/version_0/checkpoints/last.ckpt", str(sr))
            .replace("steps: 50", "steps: 4").replace("samplers.DDPM", "samplers.DDIM"))  # deterministic
    path.write_text(text)
    return str(path)


def test_sr_stage_logs_psnr_and_consistency(stages: tuple[Path, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next(stages[1].parent.parent.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"val/sr_psnr", "val/sr_consistency"} <= set(accumulator.Tags()["scalars"])


def test_cascade_predict_writes_every_stage_and_seeds_fix_the_images(stages: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    config = cascade_config(tmp_path / "cascade.yaml", *stages)
    run_cli("predict", config, *CASCADE_PREDICT, "--data.init_args.predict.num=4",
            "--data.init_args.predict.batch_size=4", root=tmp_path / "a", tiny=False)
    run_cli("predict", config, *CASCADE_PREDICT, "--data.init_args.predict.num=4",
            "--data.init_args.predict.batch_size=1", root=tmp_path / "b", tiny=False)
    one, two = read_samples(tmp_path / "a" / "predictions"), read_samples(tmp_path / "b" / "predictions")
    assert one["stage0"].shape == (4, 4, 4, 1) and one["samples"].shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(one["samples"], one["stage1"])
    for key in ("stage0", "samples"):
        np.testing.assert_array_equal(one[key], two[key])
    assert {p.name for p in (tmp_path / "a" / "predictions").iterdir()} >= {
        "samples.npz", "grid.png", "grid_stage0.png", "grid_stage1.png"}
    # the base stage alone, sampled by predict from the same seeds, gives the cascade's first stage
    base = predict_samples(BASE, *BASE_4X4, "--data.init_args.predict.num=4",
                           "--model.init_args.sampler.init_args.steps=4", root=tmp_path / "base", ckpt_path=stages[0])
    np.testing.assert_array_equal(base["samples"], one["stage0"])


def test_super_resolve_predicts_from_an_npz_of_low_res_images(stages: tuple[Path, Path], tmp_path: Path) -> None:
    low = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "low.npz", images=low)
    arrays = predict_samples(SR, "--model.init_args.sampler.init_args.steps=4",
                             "--model.init_args.predict_task=diffusion_pl.pipelines.SuperResolve",
                             "--data.init_args.predict=diffusion_pl.data.ImageFiles",
                             f"--data.init_args.predict.path={tmp_path / 'low.npz'}", root=tmp_path / "sr",
                             ckpt_path=stages[1])
    assert arrays["samples"].shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(arrays["low_res"], low)
    assert arrays["labels"].tolist() == [-1, -1, -1]


def test_cascade_with_a_wrong_final_size_says_so(stages: tuple[Path, Path], tmp_path: Path) -> None:
    config = cascade_config(tmp_path / "cascade.yaml", *stages)
    with pytest.raises(ValueError, match="last cascade stage makes 1x8x8"):
        run_cli("predict", config, *CASCADE_PREDICT, "--data.init_args.image_format.image_size=16", root=tmp_path / "c", tiny=False)


@pytest.mark.parametrize("order", ["base, base", "sr, sr"])
def test_stages_of_the_wrong_kind_are_refused(stages: tuple[Path, Path], tmp_path: Path, order: str) -> None:
    """An unconditional model as a super-resolution stage would ignore stage 0; an SR stage first has no input."""
    base, sr = stages
    config = cascade_config(tmp_path / "cascade.yaml", *((base, base) if order == "base, base" else (sr, sr)))
    Path(config).write_text(re.sub(r"\n\s*sampling_level: .*", "", Path(config).read_text()))  # a base has none
    expected = "stage 1 .* is not a super-resolution stage" if order == "base, base" else "stage 0 .* is a super-res"
    with pytest.raises(ValueError, match=expected):
        run_cli("predict", config, *CASCADE_PREDICT, root=tmp_path / "c", tiny=False)


def test_sampling_level_of_a_base_stage_is_refused(stages: tuple[Path, Path], tmp_path: Path) -> None:
    from diffusion_pl.models import CascadeStage

    with pytest.raises(ValueError, match="no low-res condition"):
        CascadeStage(str(stages[0]), sampler=DDIM(steps=4), sampling_level=0.1).load()
    assert CascadeStage(str(stages[1]), sampling_level=0.3).load().conditioner.sampling_level == 0.3


def test_vp_alpha_helper_matches_the_process() -> None:
    assert abs(float(VPSDE().alpha(torch.tensor([0.3]))) - vp_alpha(0.3)) < 1e-6
