"""Classifier guidance (Dhariwal & Nichol 2021): follow grad_x log p(y | x_t) of a classifier on noisy images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn, Prediction, x0_from_guided_eps
from diffusion_pl.processes.base import ForwardProcess

LogProbFn = Callable[[Tensor, Tensor], Tensor]


def log_prob_gradient(log_prob: LogProbFn, x_t: Tensor, t: Tensor) -> Tensor:
    """grad_x sum_i f(x_t,i, t_i) for a per-sample scalar f such as log p(y_i | x_t,i), computed in float32 even
    inside a no_grad or inference-mode sampler (as Lightning's ``predict`` runs) or under autocast.

    Autograd is on inside ``f``, so ``f`` may run the denoiser itself: a similarity of its predicted x0 (CLIP
    guidance on x0) is differentiated through the network."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x_t.detach().float().clone().requires_grad_(True)  # a clone made here is a normal tensor
        total = log_prob(x, t.clone()).float().sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad.to(x_t.dtype)


def classifier_guidance(den: DenoiseFn, log_prob: LogProbFn, process: ForwardProcess, scale: float) -> DenoiseFn:
    """eps_guided = eps - s sigma(t) grad_x log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2 / eq. 14).

    Equivalently the score gains s grad log p(y | x_t): with s = 1 and exact parts this is the score of
    p(x_t | y), so any sampler (DDPM, DDIM, SDE, ODE) samples the class-conditional distribution.

    Args:
        den: The unconditional (or conditional) denoiser.
        log_prob: (x_t, t) -> log p(y | x_t) per sample, with the target labels bound in a closure.
        process: The forward process (for sigma(t)).
        scale: Guidance scale s (0 disables guidance).
    """

    def guided(x_t: Tensor, t: Tensor) -> Prediction:
        pred = den(x_t, t)
        if scale == 0:
            return pred
        grad = log_prob_gradient(log_prob, x_t, t)
        eps = pred.eps - scale * append_dims(process.sigma(t), x_t.ndim) * grad
        return Prediction(x0=x0_from_guided_eps(eps, x_t, t, process, pred.x0), eps=eps, log_var=pred.log_var)

    return guided
