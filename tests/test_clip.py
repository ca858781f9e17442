"""CLIP: the adapter (exact save/reload, clip.load compatibility, offline errors, tokenisation, preprocessing), the
label-aware contrastive loss, and CLIP guidance against closed forms on a Gaussian mixture."""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from analytic import gaussian_mixture_denoiser
from PIL import Image
from torch import Tensor

from diffusion_pl.core.errors import ConfigError
from diffusion_pl.core.tensors import append_dims, from_uint8
from diffusion_pl.guidance import CLIP, Cutouts, clip_guidance, clip_log_prob
from diffusion_pl.guidance.clip import range_penalty, total_variation
from diffusion_pl.models.clip import label_aware_contrastive_loss
from diffusion_pl.nets.clip import (
    CLIPNet,
    CLIPWeightsNotFoundError,
    import_clip,
    load_clip,
)
from diffusion_pl.processes import DiscreteProcess

clip = import_clip()


def tiny_clip(**overrides: object) -> CLIPNet:
    args = {"image_size": 8, "in_channels": 1, "embed_dim": 16, "vision_layers": 1, "vision_width": 64,
            "vision_patch_size": 4, "context_length": 8, "transformer_width": 64, "transformer_layers": 1}
    torch.manual_seed(0)
    return CLIPNet(**{**args, **overrides}).eval()


# ----------------------------------------------------------------------------------------------- the adapter


def test_export_reloads_exactly_and_through_clip_load(tmp_path: Path) -> None:
    net = tiny_clip(in_channels=3)
    with torch.no_grad():
        net.model.logit_scale.fill_(2.5)  # a trained value, not the initial one
    path = net.export(tmp_path / "tiny.pt")
    images, prompts = torch.rand(4, 3, 8, 8) * 2 - 1, ["a photo of a cat", "a dog"]
    reloaded = load_clip(path)
    for (name, a), b in zip(net.state_dict().items(), reloaded.state_dict().values()):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(images), net.encode_image(images))
        assert torch.equal(reloaded.encode_text(prompts), net.encode_text(prompts))
        # clip.load builds the same architecture (heads re-inferred as width / 64), weights rounded through fp16.
        model, preprocess = clip.load(str(path), device="cpu", jit=False)
        ours = net.encode_image(images)
        theirs = model.encode_image(net.preprocess(images))
        torch.testing.assert_close(theirs, ours, atol=5e-3, rtol=5e-3)
        tokens = clip.tokenize(prompts, context_length=8)
        torch.testing.assert_close(model.encode_text(tokens), net.encode_text(prompts), atol=5e-3, rtol=5e-3)


def test_clip_module_checkpoint_reloads_exactly(tmp_path: Path) -> None:
    from helpers import last_checkpoint, run_trainer

    cli = run_trainer("fit", "configs/clip/fashion_mnist.yaml", "--trainer.max_epochs=1",
                      "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", root=tmp_path)
    assert 0.0 <= float(cli.trainer.callback_metrics["val/clip_acc"]) <= 1.0
    reloaded = load_clip(last_checkpoint(tmp_path))
    trained = cli.model.net
    for (name, a), b in zip(trained.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not reloaded.training and not any(p.requires_grad for p in reloaded.parameters())


def test_bare_model_name_offline_says_where_to_put_the_weights(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(CLIPWeightsNotFoundError) as info:
        load_clip("ViT-B/32", download_root=str(tmp_path))
    message = str(info.value)
    assert "ViT-B-32.pt" in message and str(tmp_path) in message and "Name or service not known" in message
    with pytest.raises(CLIPWeightsNotFoundError, match="neither a file nor a released model"):
        load_clip(str(tmp_path / "no_such_clip.pt"))


def test_tokenisation_works_offline() -> None:
    net = tiny_clip()
    tokens = net.tokenize(["a photo of a sneaker", "an extremely long prompt that is truncated to eight tokens"])
    start, end = 49406, 49407  # <|startoftext|>, <|endoftext|>: the top of the 49,408-token vocabulary
    assert tokens.shape == (2, 8) and (tokens[:, 0] == start).all()
    assert tokens[0].tolist()[:7] == [start, *clip.tokenize("a photo of a sneaker")[0, 1:6].tolist(), end]
    assert tokens[1, -1] == end  # truncated, still ending with the end token the pooled feature reads
    pooled, per_token = net.text_features(["a photo of a sneaker"])
    assert pooled.shape == (1, 16) and per_token.shape == (1, 8, 64)


def test_preprocessing_is_differentiable_and_matches_clip_load_on_pil(tmp_path: Path) -> None:
    net = tiny_clip(image_size=32, in_channels=3, vision_patch_size=8)
    _, preprocess = clip.load(str(net.export(tmp_path / "clip32.pt")), device="cpu")
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=generator), size=(24, 24),
                                             mode="bilinear", align_corners=False)
    pixels = (smooth * 255).round().to(torch.uint8)
    expected = preprocess(Image.fromarray(pixels[0].permute(1, 2, 0).numpy()))
    images = from_uint8(pixels).requires_grad_(True)
    ours = net.preprocess(images)
    assert ours.shape == (1, 3, 32, 32)
    # PIL works in uint8 (rounding): one grey level is 1 / (255 * 0.27) = 0.015 after normalisation.
    torch.testing.assert_close(ours[0], expected, atol=0.03, rtol=0)
    # The map is affine, so autograd's directional derivative equals the exact finite difference.
    weights, direction = torch.randn(ours.shape, generator=generator), torch.randn(images.shape, generator=generator)
    (grad,) = torch.autograd.grad((weights * ours).sum(), images)
    with torch.no_grad():
        change = (weights * (net.preprocess(images + direction) - ours)).sum()
    torch.testing.assert_close((grad * direction).sum(), change, rtol=1e-4, atol=1e-3)


def test_grayscale_is_repeated_to_rgb() -> None:
    net = tiny_clip()
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = ((images + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(net.preprocess(images), expected)


def test_widths_that_clip_load_cannot_reinfer_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        tiny_clip(vision_width=48)
    with pytest.raises(ValueError, match="divide image_size"):
        tiny_clip(vision_patch_size=3)


# ----------------------------------------------------------------------------------------------- the loss


def test_label_aware_contrastive_loss_closed_form() -> None:
    """Labels (0, 0, 1): image 0's positives are captions 0 and 1 with weight 1/2 each, image 2's only caption 2."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 3.0, -1.0], [0.0, 1.0, 2.0]])

    def log_softmax(row: list[float], j: int) -> float:
        return row[j] - math.log(sum(math.exp(v) for v in row))

    rows, cols = logits.tolist(), logits.T.tolist()
    image_to_text = -(0.5 * log_softmax(rows[0], 0) + 0.5 * log_softmax(rows[0], 1) + 0.5 * log_softmax(rows[1], 0)
                      + 0.5 * log_softmax(rows[1], 1) + log_softmax(rows[2], 2)) / 3
    text_to_image = -(0.5 * log_softmax(cols[0], 0) + 0.5 * log_softmax(cols[0], 1) + 0.5 * log_softmax(cols[1], 0)
                      + 0.5 * log_softmax(cols[1], 1) + log_softmax(cols[2], 2)) / 3
    loss = label_aware_contrastive_loss(logits, torch.tensor([0, 0, 1]))
    assert float(loss) == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    # Distinct labels: CLIP's InfoNCE with the diagonal as targets.
    distinct = label_aware_contrastive_loss(logits, torch.tensor([0, 1, 2]))
    diagonal = -sum(log_softmax(rows[i], i) + log_softmax(cols[i], i) for i in range(3)) / 6
    assert float(distinct) == pytest.approx(diagonal, rel=1e-6)


# ----------------------------------------------------------------------------------------------- guidance

WEIGHTS = torch.tensor([0.4, 0.6])
MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
STDS = torch.tensor([0.3, 0.5])
PROJECTION = torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.2, -0.7]])  # linear "image encoder" R^2 -> R^3
OFFSET = torch.tensor([0.5, 0.2, -0.4])
TAU = 7.0


class LinearCLIP:
    """A "CLIP" with image features g(x) = P x + o, so log p(c | x) = tau cos(g(x), h) has a closed-form gradient."""

    logit_scale = torch.tensor(TAU)

    def __init__(self) -> None:
        self.times: list[Tensor | None] = []

    def encode_image(self, images: Tensor, t: Tensor | None = None) -> Tensor:
        self.times.append(t)
        return images @ PROJECTION.T + OFFSET


def cosine_gradient(x: Tensor, h: Tensor) -> Tensor:
    """grad_x tau cos(P x + o, h) = tau P^T (h / (|u| |h|) - (u.h) u / (|u|^3 |h|)), u = P x + o."""
    u = x @ PROJECTION.T + OFFSET
    norm_u, norm_h = u.norm(dim=-1, keepdim=True), h.norm(dim=-1, keepdim=True)
    dot = (u * h).sum(-1, keepdim=True)
    return TAU * (h / (norm_u * norm_h) - dot * u / (norm_u**3 * norm_h)) @ PROJECTION


def mixture_posterior(x_t: Tensor, t: Tensor, process: DiscreteProcess) -> tuple[Tensor, Tensor]:
    """E[x0 | x_t] and Cov[x0 | x_t] of the Gaussian mixture, from its components' Gaussian posteriors."""
    a, s = append_dims(process.alpha(t), 2), append_dims(process.sigma(t), 2)
    var = a**2 * STDS**2 + s**2                                                        # (B, K)
    diff = x_t[:, None, :] - a[:, :, None] * MEANS                                     # (B, K, D)
    log_r = WEIGHTS.log() - 0.5 * (diff**2).sum(-1) / var - var.log()                  # D = 2: -D/2 log var
    r = log_r.softmax(-1)
    means = MEANS + (a * STDS**2 / var)[..., None] * diff                             # component posterior means
    variances = STDS**2 * s**2 / var                                                   # isotropic posterior variances
    mean = (r[..., None] * means).sum(1)
    outer = means[..., :, None] * means[..., None, :]
    second = (r[..., None, None] * (variances[..., None, None] * torch.eye(2) + outer)).sum(1)
    return mean, second - mean[:, :, None] * mean[:, None, :]


def setup_guidance(process: DiscreteProcess, t_value: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(t_value)
    x_t = torch.randn(64, 2, generator=generator) * 1.2
    t = torch.full((64,), t_value, dtype=torch.long)
    h = torch.tensor([[0.8, -0.1, 0.6]]).expand(64, 3)
    return x_t, t, h


@pytest.mark.parametrize("t_value", [50, 400, 900])
def test_x_t_view_gradient_matches_the_closed_form(process: DiscreteProcess, t_value: int) -> None:
    x_t, t, h = setup_guidance(process, t_value)
    den, fake, scale = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process), LinearCLIP(), 2.5
    guided = clip_guidance(den, fake, h, process, scale, view="x_t")(x_t, t)
    expected = den(x_t, t).eps - scale * append_dims(process.sigma(t), 2) * cosine_gradient(x_t, h)
    torch.testing.assert_close(guided.eps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fake.times[0], process.net_input_time(t))  # the noised CLIP gets the network time


@pytest.mark.parametrize("t_value", [50, 400, 900])
def test_x0_view_gradient_goes_through_the_denoiser(process: DiscreteProcess, t_value: int) -> None:
    """d E[x0 | x_t] / d x_t = alpha / sigma^2 Cov[x0 | x_t] (second-order Tweedie), so the x0 view's gradient is
    alpha / sigma^2 Cov[x0 | x_t] grad_x0 tau cos(g(x0), h) at x0 = E[x0 | x_t]."""
    x_t, t, h = setup_guidance(process, t_value)
    den, fake, scale = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process), LinearCLIP(), 1.5
    with torch.inference_mode():  # as in Lightning's predict
        guided = clip_guidance(den, fake, h, process, scale, view="x0")(x_t, t)
    x0, cov = mixture_posterior(x_t, t, process)
    a, s = append_dims(process.alpha(t), 2), append_dims(process.sigma(t), 2)
    grad = a / s**2 * (cov @ cosine_gradient(x0, h)[:, :, None]).squeeze(-1)
    expected = den(x_t, t).eps - scale * s * grad
    torch.testing.assert_close(guided.eps, expected, atol=1e-4, rtol=1e-4)
    assert fake.times == [None]  # a clean CLIP on the predicted x0


def test_score_form_is_glides_mean_shift(process: DiscreteProcess) -> None:
    """For a DDPM step, eps - s sigma_t grad shifts the posterior mean by s beta_t / sqrt(alpha_t) grad: GLIDE's
    mu + s' Sigma grad with Sigma = beta_t and s' = s / sqrt(alpha_t) (the equivalence the module documents)."""
    x_t, t, h = setup_guidance(process, 300)
    den, scale = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process), 3.0
    guided = clip_guidance(den, LinearCLIP(), h, process, scale, view="x_t")(x_t, t)
    mean_guided, _ = process.posterior(guided.x0, x_t, t)
    mean, _ = process.posterior(den(x_t, t).x0, x_t, t)
    beta = append_dims(process.beta(t), 2)
    glide_scale = scale / (1 - beta).sqrt()
    torch.testing.assert_close(mean_guided, mean + glide_scale * beta * cosine_gradient(x_t, h), atol=1e-5, rtol=1e-4)


def test_scale_zero_is_the_unguided_denoiser(process: DiscreteProcess) -> None:
    x_t, t, h = setup_guidance(process, 300)
    den = gaussian_mixture_denoiser(WEIGHTS, MEANS, STDS, process)
    assert torch.equal(clip_guidance(den, LinearCLIP(), h, process, 0.0)(x_t, t).eps, den(x_t, t).eps)


def test_full_size_cutouts_are_the_whole_image() -> None:
    net = tiny_clip()
    images, h = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 16)
    step = torch.tensor([10])
    with torch.no_grad():
        whole = clip_log_prob(net, images, h)
        cut = clip_log_prob(net, images, h, cutouts=Cutouts(count=4, min_fraction=1.0), step=step)
        assert not torch.equal(clip_log_prob(net, images, h, cutouts=Cutouts(4, 0.5), step=step), whole)
    torch.testing.assert_close(cut, whole, atol=1e-5, rtol=1e-5)


def test_total_variation_and_range_penalties() -> None:
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 3, 4) * 0.5  # horizontal steps of 0.5
    # Replicate padding: the last column's difference is 0; 3 x 3 of the 12 pixels have 0.5^2.
    assert float(total_variation(ramp)) == pytest.approx(9 * 0.25 / 12)
    values = torch.tensor([-2.0, 0.5, 1.5, 1.0]).view(1, 1, 2, 2)
    assert float(range_penalty(values)) == pytest.approx((1.0 + 0.25) / 4)


def test_clip_part_guides_inside_inference_mode(tmp_path: Path, process: DiscreteProcess) -> None:
    """The configured part on a saved tiny CLIP: a clean CLIP guides the x0 view (inference mode, as predict), and
    refuses the x_t view it cannot read."""
    path = str(tiny_clip().export(tmp_path / "clip.pt"))
    part = CLIP(model=path, scale=2.0, view="x0", prompts=["a photo of a 3"])
    part.prepare(process, torch.device("cpu"))
    x_t, t = torch.randn(2, 1, 8, 8), torch.full((2,), 500, dtype=torch.long)
    den = gaussian_mixture_denoiser(WEIGHTS, torch.zeros(2, 64), STDS, process)

    def image_denoiser(x: Tensor, time: Tensor, **cond: Tensor):  # the mixture on flattened 8 x 8 images
        pred = den(x.flatten(1), time)
        return type(pred)(x0=pred.x0.view_as(x), eps=pred.eps.view_as(x))

    batch = part.example_batch(2, "cpu")
    assert batch == {"prompt": ["a photo of a 3", "a photo of a 3"]}
    with torch.inference_mode():
        guided = part.wrap(image_denoiser, batch=batch, cond={}, null={}, process=process)(x_t, t)
    assert not torch.equal(guided.eps, image_denoiser(x_t, t).eps) and torch.isfinite(guided.eps).all()
    with pytest.raises(ConfigError, match="noisy x_t"):
        CLIP(model=path, view="x_t").prepare(process, torch.device("cpu"))
    with pytest.raises(ConfigError, match="predict.prompts"):
        part.wrap(image_denoiser, batch={"seed": torch.arange(2)}, cond={}, null={}, process=process)
