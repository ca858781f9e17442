"""Guidance against a two-class Gaussian mixture whose score and p(y | x_t) are exact at every t."""

from __future__ import annotations

import math

import pytest
import torch
from analytic import gaussian_denoiser
from torch import Tensor, nn

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.guidance import (
    batched_classifier_free,
    classifier_free,
    classifier_guidance,
    log_prob_gradient,
)
from diffusion_pl.parameterization import DenoiseFn, Denoiser, Eps, Prediction, eps_from_x0
from diffusion_pl.processes import VPSDE, DiscreteProcess, ForwardProcess
from diffusion_pl.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_euler_maruyama,
    sample_ode,
    sample_pc,
    sde_times,
    strided_grid,
)

WEIGHTS = torch.tensor([0.3, 0.7])
MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
STD = 0.3
N = 10_000


def responsibilities(x_t: Tensor, t: Tensor, process: ForwardProcess) -> Tensor:
    """log p(y = k | x_t) for the noised mixture: components N(a m_k, (a^2 s^2 + sigma^2) I)."""
    a, s = append_dims(process.alpha(t), 2), append_dims(process.sigma(t), 2)
    var = a**2 * STD**2 + s**2
    sq = ((x_t[:, None, :] - a[:, None] * MEANS[None]) ** 2).sum(-1)
    log_joint = WEIGHTS.log()[None] - sq / (2 * var) - x_t.shape[1] * 0.5 * torch.log(2 * math.pi * var)
    return log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)


def mixture_denoiser(process: ForwardProcess) -> DenoiseFn:
    """Exact E[x0 | x_t] = sum_k p(k | x_t) E_k[x0 | x_t]."""
    components = [gaussian_denoiser(MEANS[k], torch.full((2,), STD), process) for k in range(2)]

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        r = responsibilities(x_t, t, process).exp()
        x0 = sum(r[:, k : k + 1] * components[k](x_t, t).x0 for k in range(2))
        return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process))

    return denoise


def class_log_prob(y: int, process: ForwardProcess):
    return lambda x_t, t: responsibilities(x_t, t, process)[:, y]


def component_fractions(x: Tensor) -> Tensor:
    nearest = torch.cdist(x, MEANS).argmin(1)
    return torch.stack([(nearest == k).float().mean() for k in range(2)])


def test_scale_zero_is_unconditional(process: DiscreteProcess) -> None:
    gen = torch.Generator().manual_seed(0)
    x_T = process.prior_sample((N, 2), generator=gen)
    guided = classifier_guidance(mixture_denoiser(process), class_log_prob(0, process), process, 0.0)
    x = sample_ddpm(guided, process, x_T, generator=gen)
    fractions = component_fractions(x)
    stderr = math.sqrt(0.3 * 0.7 / N)
    assert abs(fractions[0].item() - 0.3) < 5 * stderr


@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_scale_one_samples_the_class_conditional(process: DiscreteProcess, target: int, sampler: str) -> None:
    gen = torch.Generator().manual_seed(target)
    x_T = process.prior_sample((N, 2), generator=gen)
    guided = classifier_guidance(mixture_denoiser(process), class_log_prob(target, process), process, 1.0)
    if sampler == "ddpm":
        x = sample_ddpm(guided, process, x_T, generator=gen)
    else:
        x = sample_ddim(guided, process, x_T, grid=strided_grid(process.num_steps, 200), eta=0.0)
    assert component_fractions(x)[target].item() > 0.999
    mean_err = (x.mean(0) - MEANS[target]).abs().max().item()
    assert mean_err < 5 * STD / math.sqrt(N) + (0.02 if sampler == "ddim" else 0.0)
    assert abs(x.std(0).mean().item() / STD - 1) < (0.05 if sampler == "ddim" else 5 / math.sqrt(2 * N))


def test_classifier_free_w0_equals_conditional_and_combination_is_exact(process: DiscreteProcess) -> None:
    cond = gaussian_denoiser(MEANS[0], torch.full((2,), STD), process)
    uncond = mixture_denoiser(process)
    x_t, t = torch.randn(64, 2), torch.randint(1, 1001, (64,))
    zero = classifier_free(cond, uncond, 0.0, process)(x_t, t)
    torch.testing.assert_close(zero.eps, cond(x_t, t).eps)
    torch.testing.assert_close(zero.x0, cond(x_t, t).x0, rtol=1e-4, atol=1e-4)
    w = 2.5
    guided = classifier_free(cond, uncond, w, process)(x_t, t)
    torch.testing.assert_close(guided.eps, 3.5 * cond(x_t, t).eps - 2.5 * uncond(x_t, t).eps)
    torch.testing.assert_close(process.add_noise(guided.x0, t, guided.eps), x_t, rtol=1e-3, atol=1e-3)


def test_classifier_free_w_equals_exact_classifier_guidance_with_scale_1_plus_w(process: DiscreteProcess) -> None:
    """(1 + w) grad log p(x|y) - w grad log p(x) = grad log p(x) + (1 + w) grad log p(y|x) (Bayes' rule)."""
    cond = gaussian_denoiser(MEANS[1], torch.full((2,), STD), process)
    uncond = mixture_denoiser(process)
    x_t, t = torch.randn(64, 2), torch.randint(2, 1001, (64,))
    cfg = classifier_free(cond, uncond, 2.0, process)(x_t, t)
    cg = classifier_guidance(uncond, class_log_prob(1, process), process, 3.0)(x_t, t)
    torch.testing.assert_close(cfg.eps, cg.eps, rtol=1e-3, atol=1e-3)


class LabelNet(nn.Module):
    """A tiny conditional net: output depends on x, t and the label (null label = num_classes)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes + 1, 2)
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.lin(torch.cat([x, t[:, None] / 1000], 1)) * self.embed(y)


def test_batched_classifier_free_matches_two_passes(process: DiscreteProcess) -> None:
    torch.manual_seed(0)
    denoiser = Denoiser(LabelNet(), process, Eps())
    x_t, t = torch.randn(8, 2), torch.randint(1, 1001, (8,))
    y, null = torch.randint(0, 3, (8,)), torch.full((8,), 3)
    batched = batched_classifier_free(denoiser.bind(), 1.5, {"y": y}, {"y": null}, process)(x_t, t)
    separate = classifier_free(denoiser.bind(y=y), denoiser.bind(y=null), 1.5, process)(x_t, t)
    torch.testing.assert_close(batched.eps, separate.eps)
    torch.testing.assert_close(batched.x0, separate.x0)


def test_guidance_gradient_finite_under_bf16_autocast(process: DiscreteProcess) -> None:
    classifier = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    x_t, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500)
    labels = torch.tensor([0, 3, 5, 9])

    def log_prob(x: Tensor, _: Tensor) -> Tensor:
        return classifier(x).float().log_softmax(-1)[torch.arange(4), labels]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        grad = log_prob_gradient(log_prob, x_t, t)
        guided = classifier_guidance(lambda x, s: Prediction(x0=torch.zeros_like(x), eps=torch.zeros_like(x)),
                                     log_prob, process, 2.0)(x_t, t)
    assert grad.shape == x_t.shape and grad.dtype == x_t.dtype and bool(torch.isfinite(grad).all())
    assert grad.abs().sum().item() > 0 and bool(torch.isfinite(guided.eps).all())


def test_guidance_gradient_inside_inference_mode_equals_plain_autograd() -> None:
    """Lightning's ``predict`` samples under ``torch.inference_mode``; the gradient must still be the right one."""
    weight = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 4])

    def log_prob(x: Tensor, _: Tensor) -> Tensor:
        return (x.flatten(1) @ weight.T).log_softmax(-1)[torch.arange(2), labels]

    x_t, t = torch.randn(2, 1, 8, 8), torch.full((2,), 10)
    expected = log_prob_gradient(log_prob, x_t, t)
    with torch.inference_mode():
        inside = log_prob_gradient(log_prob, x_t.clone(), t.clone())
    # closed form: d/dx log softmax(Wx)_y = W_y - softmax(Wx) W
    logits = x_t.flatten(1) @ weight.T
    closed = (weight[labels] - logits.softmax(-1) @ weight).view_as(x_t)
    torch.testing.assert_close(expected, closed)
    torch.testing.assert_close(inside, closed)


SDE_SAMPLERS = {
    "euler_maruyama": lambda den, process, x, gen: sample_euler_maruyama(den, process, x,
                                                                         grid=sde_times(process, 1000), generator=gen),
    "pc": lambda den, process, x, gen: sample_pc(den, process, x, grid=sde_times(process, 500), step_size_norm="batch",
                                                 generator=gen),
    "ode": lambda den, process, x, gen: sample_ode(den, process, x, method="heun",
                                                   grid=sde_times(process, 100, "log_snr")),
}


@pytest.mark.parametrize("sampler", list(SDE_SAMPLERS))
def test_scale_one_guides_the_sde_samplers_to_the_class_conditional(sampler: str) -> None:
    """The same wrapper on the VP SDE: Euler-Maruyama, predictor-corrector and the probability-flow ODE sample the
    minority component of the mixture (weight 0.3) with its mean and spread."""
    process = VPSDE()
    gen = torch.Generator().manual_seed(0)
    x_T = process.prior_sample((N, 2), generator=gen)
    guided = classifier_guidance(mixture_denoiser(process), class_log_prob(0, process), process, 1.0)
    x = SDE_SAMPLERS[sampler](guided, process, x_T, gen)
    assert component_fractions(x)[0].item() > 0.995
    assert (x.mean(0) - MEANS[0]).abs().max().item() < 5 * STD / math.sqrt(N) + 0.02
    assert abs(x.std(0).mean().item() / STD - 1) < 0.05
