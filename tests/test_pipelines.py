"""Interpolation and inpainting against closed forms: exact denoisers of Gaussian data, no network."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from analytic import gaussian_denoiser
from helpers import DDPM_FASHION, last_checkpoint, predict_samples, run_cli, run_cli_processes, tiny_args
from PIL import Image
from torch import Tensor

from diffusion_pl.core.errors import ConfigError, DataError
from diffusion_pl.nets.first_stage import FirstStage, IdentityStage
from diffusion_pl.parameterization import DenoiseFn, Prediction, eps_from_x0
from diffusion_pl.pipelines import (
    check_mask,
    inpaint,
    interpolate,
    interpolate_ddim,
    load_mask,
    mix_noised,
    named_mask,
    repaint_schedule,
    slerp,
    start_grid,
)
from diffusion_pl.processes import VPSDE, DiscreteProcess, ForwardProcess
from diffusion_pl.samplers import DDIM, DDPM, Sampler


@dataclass
class ExactModel:
    """A "trained model" whose denoiser is exact for the data: what the pipelines need of a DiffusionModule."""

    process: ForwardProcess
    sampler: Sampler
    make_denoiser: Any
    first_stage: FirstStage = field(default_factory=IdentityStage)
    device: torch.device = torch.device("cpu")

    def sampling_denoiser(self, process: ForwardProcess, batch: dict[str, Any],
                          generator: torch.Generator | None = None) -> DenoiseFn:
        return self.make_denoiser(process)


def correlated_denoiser(mean: Tensor, cov: Tensor, process: ForwardProcess) -> DenoiseFn:
    """Exact E[x0 | x_t] for x0 ~ N(mean, cov) in D dims, x_t (B, ..., D) = a x0 + s eps:
    E[x0 | x_t] = mean + a cov (a^2 cov + s^2 I)^-1 (x_t - a mean) (Gaussian conjugacy)."""

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        times = t[:1] if bool((t == t[0]).all()) else t  # a sampler's one time per batch: one gain for all
        a = process.alpha(times).double()
        s = process.sigma(times).double()
        shape = x_t.shape
        flat = x_t.reshape(shape[0], -1).double()
        eye = torch.eye(len(mean), dtype=torch.float64)
        gain = a[:, None, None] * cov @ torch.linalg.inv(a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * eye)
        x0 = mean + (gain @ (flat - a[:, None] * mean)[..., None])[..., 0]
        x0 = x0.to(x_t.dtype).reshape(shape)
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process))

    return denoise


# ------------------------------------------------------------------------------------------------ interpolation


def test_shared_noise_keeps_unit_variance_for_every_lambda() -> None:
    """x_bar_t = alpha ((1 - l) z + l z') + sigma eps exactly; independent noises would shrink the noise to
    sqrt((1 - l)^2 + l^2) (0.707 at l = 1/2), which the same Monte Carlo shows."""
    generator = torch.Generator().manual_seed(0)
    z, z_prime = torch.randn(1, 4, generator=generator), torch.randn(1, 4, generator=generator)
    lambdas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    noise = torch.randn(200_000, 1, 4, generator=generator)
    mixed = torch.stack([mix_noised(z, z_prime, lambdas, alpha, sigma, n) for n in noise[:5]])
    signal = alpha * ((1 - lambdas[:, None]) * z + lambdas[:, None] * z_prime)
    torch.testing.assert_close(mixed, signal + sigma * noise[:5])
    independent = (1 - 0.5) * noise[: len(noise) // 2] + 0.5 * noise[len(noise) // 2:]
    assert float(independent.std()) == pytest.approx(0.5**0.5, rel=0.01)


@pytest.mark.parametrize("sampler", [DDIM(steps=50), DDPM()])
def test_interpolation_endpoints_come_back_at_small_t(sampler: Sampler) -> None:
    process = DiscreteProcess(1000, "cosine")
    mean, std = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    model = ExactModel(process, sampler, lambda p: gaussian_denoiser(mean, std, p))
    generator = torch.Generator().manual_seed(1)
    x, x_prime = torch.rand(1, 4, 4) * 2 - 1, torch.rand(1, 4, 4) * 2 - 1
    out = interpolate(model, x, x_prime, torch.tensor([0.0, 1.0]), t=0.02, generator=generator)
    assert out.shape == (2, 1, 4, 4)
    # sigma(t) = 0.044 at t = 0.02 T (cosine): the endpoints come back up to noise of that size
    assert float((out[0] - x).abs().mean()) < 0.06 and float((out[1] - x_prime).abs().mean()) < 0.06
    far = interpolate(model, x, x_prime, torch.tensor([0.0]), t=1.0, generator=generator)
    assert float((far[0] - x).abs().mean()) > 0.3  # from T the image is forgotten


def test_start_grid_cuts_the_sampler_grid() -> None:
    process = DiscreteProcess(1000, "cosine")
    assert start_grid(DDIM(steps=10).grid(process), 0.5).tolist() == [500, 400, 300, 200, 100, 0]
    assert start_grid(DDPM().grid(process.respace(list(range(10, 1001, 10)))), 0.25)[0] == 25
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        start_grid(DDIM(steps=10).grid(process), 0.0)


def test_ddim_inversion_then_ddim_reconstructs_the_input() -> None:
    """With the exact denoiser of Gaussian data, inversion and sampling integrate the same probability-flow ODE."""
    process = DiscreteProcess(1000, "cosine")
    mean, std = torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 0.5)
    model = ExactModel(process, DDIM(steps=50), lambda p: gaussian_denoiser(mean, std, p))
    x, x_prime = torch.tensor([[[0.5, -0.3], [0.1, 0.7]]]), torch.tensor([[[-0.4, 0.6], [0.3, 0.0]]])
    ends = interpolate_ddim(model, x, x_prime, torch.tensor([0.0, 1.0]), steps=200)
    torch.testing.assert_close(ends[0], x, atol=0.02, rtol=0)
    torch.testing.assert_close(ends[1], x_prime, atol=0.02, rtol=0)


def test_slerp_keeps_the_norm_of_orthogonal_latents() -> None:
    z, z_prime = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    out = slerp(z, z_prime, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out.norm(dim=1), torch.full((3,), 3.0))
    torch.testing.assert_close(out[0], z[0])
    torch.testing.assert_close(out[2], z_prime[0])


# -------------------------------------------------------------------------------------------------- inpainting

RHO = 0.9
COV = torch.tensor([[1.0, RHO], [RHO, 1.0]], dtype=torch.float64)
X1 = 1.0  # the known coordinate; x2 | x1 ~ N(rho x1, 1 - rho^2)


def conditional_inpaint(method: str, sampler: Sampler, **options: Any) -> Tensor:
    process = DiscreteProcess(100, "linear")
    model = ExactModel(process, sampler, lambda p: correlated_denoiser(torch.zeros(2, dtype=torch.float64), COV, p))
    images = torch.tensor([X1, 0.0]).expand(4000, 1, 1, 2).clone()
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    return inpaint(model, images, mask, method=method, generator=torch.Generator().manual_seed(0), **options)


def test_repaint_samples_the_exact_conditional_and_keeps_the_known_coordinate() -> None:
    """x2 | x1 = 1 is N(0.9, 0.19). Measured (T = 100, 4000 samples): jump 5, r = 10: 0.861 / 0.213; jump 5, r = 20:
    0.879 / 0.208; jump 1, r = 20: 0.883 / 0.200; r = 1 is plain replacement (0.610 / 0.332)."""
    out = conditional_inpaint("repaint", DDPM(), jump_length=1, resample=20)
    assert bool((out[..., 0] == X1).all())
    x2 = out[..., 1].flatten().double()
    # 4000 samples: standard error of the mean 0.007, of the variance 0.004
    assert float(x2.mean()) == pytest.approx(RHO * X1, abs=0.035)
    assert float(x2.var()) == pytest.approx(1 - RHO**2, abs=0.02)


@pytest.mark.parametrize("method", ["replace", "x0"])
def test_replacement_methods_keep_the_known_coordinate_and_are_biased_within_a_bound(method: str) -> None:
    """Replacement ignores how x1 constrains x2 at high noise (Lugmayr et al. 2022, Sec. 3): on this data x2 comes
    out with mean 0.61 and variance 0.33 ("replace"), 0.62 and 0.39 ("x0"), instead of 0.9 and 0.19 (measured with
    DDPM, T = 100, 4000 samples). The bounds document that bias."""
    out = conditional_inpaint(method, DDPM())
    assert bool((out[..., 0] == X1).all())
    x2 = out[..., 1].flatten().double()
    assert 0.5 < float(x2.mean()) < 0.75 and 0.25 < float(x2.var()) < 0.45


def test_inpainting_runs_with_an_sde_model_and_its_sampler() -> None:
    from diffusion_pl.samplers import EulerMaruyama

    process = VPSDE()
    model = ExactModel(process, EulerMaruyama(steps=50),
                       lambda p: correlated_denoiser(torch.zeros(2, dtype=torch.float64), COV, p))
    images = torch.tensor([X1, 0.0]).expand(500, 1, 1, 2).clone()
    out = inpaint(model, images, torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2), generator=torch.Generator())
    assert bool((out[..., 0] == X1).all()) and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="RePaint steps a discrete"):
        inpaint(model, images[:2], torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2), method="repaint")


SIDE = 4
#: 4x4 Gaussian images, covariance rho^(|di| + |dj|) between pixels (di, dj) apart: neighbour correlation 0.9.
APART = (torch.arange(SIDE)[:, None] - torch.arange(SIDE)[None, :]).abs()
IMAGE_COV = (RHO ** (APART[:, None, :, None] + APART[None, :, None, :]).double()).reshape(SIDE**2, SIDE**2)


@pytest.mark.parametrize(("steps", "jump", "resample", "close"), [(40, 1, 8, True), (25, 5, 5, False)])
def test_readme_budget_repaint_samples_the_exact_conditional_of_correlated_images(steps: int, jump: int, resample: int,
                                                                                   close: bool) -> None:
    """The README's budget RePaint (40 respaced steps, jump 1, resample 8: 313 evaluations) fills the right half of
    4x4 Gaussian images whose left half is 1.0 with their exact conditional N(mu, S), mu = C_uk C_kk^-1 x_k,
    S = C_uu - C_uk C_kk^-1 C_ku, on the linear schedule; the earlier budget (25 steps, jump 5, resample 5) does not.
    tools/inpaint_budget.py, 20000 samples: 0.085-0.090 conditional std off the mean, variances x1.07-1.14 (earlier
    budget: 0.22, x1.19-1.44)."""
    process = DiscreteProcess(1000, "linear")
    model = ExactModel(process, DDPM(), lambda p: correlated_denoiser(torch.zeros(SIDE**2, dtype=torch.float64),
                                                                      IMAGE_COV, p))
    mask = torch.zeros(1, 1, SIDE, SIDE)
    mask[..., : SIDE // 2] = 1.0
    out = inpaint(model, mask.expand(4000, 1, SIDE, SIDE).clone(), mask, method="repaint", steps=steps,
                  jump_length=jump, resample=resample, generator=torch.Generator().manual_seed(0))
    known = mask.flatten().bool()
    c_kk, c_uk = IMAGE_COV[known][:, known], IMAGE_COV[~known][:, known]
    mean = c_uk @ torch.linalg.solve(c_kk, torch.ones(int(known.sum()), dtype=torch.float64))
    var = (IMAGE_COV[~known][:, ~known] - c_uk @ torch.linalg.solve(c_kk, c_uk.T)).diagonal()
    filled = out.reshape(len(out), -1)[:, ~known].double()
    # 4000 samples: standard error 0.016 conditional std on each mean, 0.022 on each variance ratio
    mean_error = float(((filled.mean(0) - mean) / var.sqrt()).abs().max())
    ratio = filled.var(0) / var
    assert bool((out.reshape(len(out), -1)[:, known] == 1.0).all())
    assert (mean_error < 0.15 and 0.85 < float(ratio.min()) and float(ratio.max()) < 1.2) == close, (mean_error, ratio)


def test_repaint_schedule_matches_the_paper_code() -> None:
    """Lugmayr et al.'s get_schedule_jump(t_T=10, jump_length=2, jump_n_sample=2), shifted to states x_k = t + 1."""
    states = repaint_schedule(10, 2, 2)
    assert states[:8] == [10, 9, 8, 7, 8, 9, 8, 7] and states[-1] == 0
    assert all(abs(a - b) == 1 for a, b in zip(states, states[1:]))
    assert sum(b < a for a, b in zip(states, states[1:])) == 18  # reverse steps: the network evaluations


# ------------------------------------------------------------------------------------------------------- masks


def test_named_masks_have_the_documented_regions() -> None:
    left = named_mask("left_half", 8)
    assert left.shape == (1, 1, 8, 8) and float(left[..., :4].sum()) == 0 and float(left[..., 4:].mean()) == 1
    box = named_mask("center_box", 32, box=14)
    assert float((1 - box).sum()) == 14 * 14 and float(box[0, 0, 9:23, 9:23].sum()) == 0
    boxes = named_mask("random_boxes", 16, generator=torch.Generator().manual_seed(0))
    assert 0 < float((1 - boxes).sum()) <= 3 * 16
    with pytest.raises(ValueError, match="left_half"):
        named_mask("top", 8)


def test_mask_files_and_wrong_sizes(tmp_path: Path) -> None:
    painted = np.zeros((8, 8), dtype=np.uint8)
    painted[2:4, 2:6] = 255  # white: to fill in
    Image.fromarray(painted).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png", 8)
    assert float((1 - mask).sum()) == 8 and float(mask[0, 0, 2, 2]) == 0
    with pytest.raises(DataError, match="8x8, the images are 16x16"):
        load_mask(tmp_path / "mask.png", 16)
    with pytest.raises(DataError, match="not found: give an image of 8x8 pixels"):
        load_mask(tmp_path / "absent.png", 8)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match=r"text.png does not decode .*: give an image of 8x8 pixels"):
        load_mask(tmp_path / "text.png", 8)
    with pytest.raises(ValueError, match=r"\(1 or B, 1, H, W\)"):
        check_mask(torch.ones(1, 1, 4, 4), torch.zeros(2, 1, 8, 8))


def test_masks_that_keep_every_pixel_or_none_are_refused(tmp_path: Path) -> None:
    """Nothing to fill in (the output would be the input) or nothing known (plain sampling): refused before any
    sampling, naming the mask (its file, or the named mask and box) and, in a batch, the items."""
    images = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="the inpainting mask keeps every pixel: there is nothing to fill in"):
        inpaint(ExactModel(DiscreteProcess(100, "linear"), DDPM(), None), images, torch.ones(1, 1, 8, 8))  # never samples
    with pytest.raises(ConfigError, match="keeps no pixel: that is plain sampling.*without the Inpaint task"):
        check_mask(torch.zeros(1, 1, 8, 8), images)
    one_full = torch.ones(2, 1, 8, 8)
    one_full[0, ..., :4] = 0
    with pytest.raises(ConfigError, match=r"keeps every pixel of item\(s\) \[1\] of the batch"):
        check_mask(one_full, images)
    with pytest.raises(ConfigError, match="mask 'center_box' of 8x8 images with box=8 keeps no pixel"):
        named_mask("center_box", 8, box=8)
    with pytest.raises(ConfigError, match="must be 1 to 8 pixels"):
        named_mask("center_box", 8, box=10)
    for value, problem in ((0, "keeps every pixel"), (255, "keeps no pixel")):  # white marks the region to fill in
        Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(tmp_path / f"{value}.png")
        with pytest.raises(ConfigError, match=f"mask image .*{value}.png {problem}"):
            load_mask(tmp_path / f"{value}.png", 8)


# ---------------------------------------------------------------------------------------------- command line


# Tiny ``predict`` runs of the checkpoint with an overlay (overlays/inpaint.yaml, ...) after the model's config.
PREDICT = ["--model.init_args.sampler.steps=5"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    run_cli("fit", DDPM_FASHION, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--model.init_args.sampler.steps=5", root=root)
    return last_checkpoint(root)


@pytest.mark.parametrize("method", ["replace", "repaint", "x0"])
def test_predict_inpaints_test_images_and_keeps_the_known_pixels(tmp_path: Path, tiny_checkpoint: Path,
                                                                  method: str) -> None:
    out = predict_samples(DDPM_FASHION, *PREDICT, "--data.init_args.predict.num=4",
                          f"--model.init_args.predict_task.method={method}", "--model.init_args.predict_task.steps=5",
                          "--model.init_args.predict_task.resample=2", "--model.init_args.predict_task.jump_length=2",
                          root=tmp_path, overlays=["overlays/inpaint.yaml"], ckpt_path=tiny_checkpoint, grid=True)
    samples, inputs, masks = out["samples"], out["inputs"], out["masks"]
    assert samples.shape == inputs.shape == (4, 8, 8, 1) and masks.shape == (4, 8, 8, 1)
    known = masks.astype(bool)
    assert known.sum() == 4 * (64 - 16) and np.array_equal(samples[known], inputs[known])
    assert not np.array_equal(samples[~known], inputs[~known])
    assert out["index"].tolist() == [0, 1, 2, 3] and out["labels"].shape == (4,)


def test_bad_mask_files_are_one_error_line_of_the_command_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A mask file that is missing, does not decode, has another size or marks nothing to fill in: exit status 2 and
    one ``error:`` line naming the file (and the size wanted), no traceback, no samples written."""
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    cases = {"missing.png": "not found: give an image of 8x8 pixels", "garbage.png": "does not decode",
             "big.png": "is 16x16, the images are 8x8", "black.png": "keeps every pixel"}
    commands = [["predict", *tiny_args(tmp_path / "runs" / name, *PREDICT, "--data.init_args.predict.num=2",
                                       f"--model.init_args.predict_task.mask_file={tmp_path / name}",
                                       "--ckpt_path", str(tiny_checkpoint), overlays=["overlays/inpaint.yaml"])]
                for name in cases]
    for (name, phrase), result in zip(cases.items(), run_cli_processes(commands)):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, f"{name}:\n{result.stderr[-3000:]}"
        assert len(errors) == 1 and f"mask image {tmp_path / name}" in errors[0] and phrase in errors[0], errors
        assert not list((tmp_path / "runs" / name).rglob("samples.npz"))


def test_predict_interpolates_pairs_of_test_images(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = predict_samples(DDPM_FASHION, *PREDICT, "--data.init_args.predict.num=4",
                          "--data.init_args.predict.batch_size=4", "--model.init_args.predict_task.lambdas=[0,0.5,1]",
                          root=tmp_path, overlays=["overlays/interpolate.yaml"], ckpt_path=tiny_checkpoint, grid=True)
    assert out["samples"].shape == (2 * 3, 8, 8, 1) and out["lambda"].tolist() == [0, 0.5, 1] * 2


def test_seam_energy_counts_only_pairs_across_the_border() -> None:
    from diffusion_pl.metrics.inpainting import seam_energy

    mask = torch.ones(1, 1, 4, 4)
    mask[..., 2:] = 0  # the right half is filled in: 4 horizontal pairs cross the border, none vertical
    smooth = torch.zeros(1, 1, 4, 4)
    step = smooth.clone()
    step[..., 2:] = 1.0  # a jump of 1 exactly at the border
    inside = smooth.clone()
    inside[..., 3] = 5.0  # a jump away from the border does not count
    torch.testing.assert_close(seam_energy(torch.cat([smooth, step, inside]), mask),
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):  # names out of order on purpose: files are read in name order
        Image.fromarray(image[..., 0]).save(folder / f"img_{len(images) - i:03d}.png")


def test_predict_inpaints_images_from_a_folder(tmp_path: Path, tiny_checkpoint: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    write_pngs(tmp_path / "inputs", images)
    out = predict_samples(DDPM_FASHION, *PREDICT, "--data.init_args.predict=diffusion_pl.data.ImageFiles",
                          f"--data.init_args.predict.path={tmp_path / 'inputs'}",
                          root=tmp_path / "run", overlays=["overlays/inpaint.yaml"], ckpt_path=tiny_checkpoint,
                          grid=True)
    in_name_order = images[::-1]
    np.testing.assert_array_equal(out["inputs"], in_name_order)
    known = out["masks"].astype(bool)
    np.testing.assert_array_equal(out["samples"][known], in_name_order[known])
    assert out["labels"].tolist() == [-1, -1, -1]


def test_predict_images_errors_say_what_is_wrong(tmp_path: Path) -> None:
    from diffusion_pl.data.predict import PredictInputError, load_predict_images

    with pytest.raises(PredictInputError, match="does not exist"):
        load_predict_images(str(tmp_path / "missing"), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictInputError, match="holds no image files"):
        load_predict_images(str(tmp_path / "empty"), 1)
    mixed = tmp_path / "mixed"
    write_pngs(mixed, np.zeros((1, 8, 8, 1), dtype=np.uint8))
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(mixed / "small.png")
    with pytest.raises(PredictInputError, match="different sizes"):
        load_predict_images(str(mixed), 1)
    np.savez(tmp_path / "wrong.npz", pictures=np.zeros((1, 4, 4, 1), dtype=np.uint8))
    with pytest.raises(PredictInputError, match="no images or samples array"):
        load_predict_images(str(tmp_path / "wrong.npz"), 1)
    np.savez(tmp_path / "float.npz", images=np.zeros((1, 4, 4, 1), dtype=np.float32))
    with pytest.raises(PredictInputError, match="must be uint8"):
        load_predict_images(str(tmp_path / "float.npz"), 1)
    rgb = np.random.default_rng(1).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", samples=rgb, labels=np.array([3, 4]))
    data = load_predict_images(str(tmp_path / "rgb.npz"), 3)
    np.testing.assert_array_equal(data.images.permute(0, 2, 3, 1).numpy(), rgb)
    assert data.labels.tolist() == [3, 4]


def test_predict_trajectory_shows_each_seed_forming_and_leaves_the_samples_as_they_are(tmp_path: Path,
                                                                                      tiny_checkpoint: Path) -> None:
    """The Trajectory task writes each seed's states at evenly spaced steps (N x frames x H x W x C) beside samples
    identical to a plain predict of the same seeds (the observer changes nothing); the frames go from the first step's
    noisy state to the sample. (A 2-step model's x0 estimates saturate; test_fast_samplers checks x0_hat exactly.)"""
    out = predict_samples(DDPM_FASHION, *PREDICT, "--data.init_args.predict.num=4",
                          "--model.init_args.predict_task.frames=3", "--model.init_args.predict_task.show=x",
                          root=tmp_path / "trajectory", overlays=["overlays/trajectory.yaml"], ckpt_path=tiny_checkpoint)
    plain = predict_samples(DDPM_FASHION, *PREDICT, "--data.init_args.predict.num=4", root=tmp_path / "plain",
                            ckpt_path=tiny_checkpoint)
    assert np.array_equal(out["samples"], plain["samples"])
    trajectory = out["trajectory"]
    assert trajectory.shape == (4, 3, 8, 8, 1) and trajectory.dtype == np.uint8
    assert np.array_equal(trajectory[:, -1], out["samples"])
    assert not np.array_equal(trajectory[:, 0], trajectory[:, -1])


@pytest.mark.parametrize("length", [1, 2, 3, 7, 16, 17, 100, 1000])
def test_step_keeper_spreads_its_frames_over_the_whole_run(length: int) -> None:
    """Whatever the run's length, the frames start at its first step, end at its last, keep order and are spread
    over the run (no gap above twice the even spacing), holding at most 2 x frames + 1 steps."""
    from diffusion_pl.pipelines.trajectory import StepKeeper

    keeper = StepKeeper(frames=5)
    for step in range(length):
        keeper(step, torch.tensor(step))
        assert len(keeper.kept) <= 2 * 5
    steps = [int(value) for value in keeper.evenly()]
    assert len(steps) == 5 and steps[0] == 0 and steps[-1] == length - 1 and steps == sorted(steps)
    assert max(b - a for a, b in zip(steps, steps[1:])) <= max(1, 2 * (length - 1) / 4 + 1)
