"""Classifier-free guidance (Ho & Salimans 2022): eps_guided = (1 + w) eps(x_t, y) - w eps(x_t)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_pl.parameterization import ConditionalDenoiseFn, DenoiseFn, Prediction, x0_from_guided_eps
from diffusion_pl.processes.base import ForwardProcess


def combine_guided(cond: Prediction, uncond: Prediction, w: float, x_t: Tensor, t: Tensor,
                   process: ForwardProcess) -> Prediction:
    """(1 + w) eps_c - w eps_u, with x0 made consistent with the guided eps; the variance is the conditional one.

    w = 0 is the conditional model, w = -1 the unconditional one (Ho & Salimans 2022, eq. 6). Where alpha(t) = 0
    (zero terminal SNR) x0 is combined alike, (1 + w) x0_c - w x0_u, which equals the x0 of the guided eps elsewhere.
    """
    eps = (1 + w) * cond.eps - w * uncond.eps
    x0 = x0_from_guided_eps(eps, x_t, t, process, (1 + w) * cond.x0 - w * uncond.x0)
    return Prediction(x0=x0, eps=eps, log_var=cond.log_var)


def classifier_free(cond: DenoiseFn, uncond: DenoiseFn, w: float, process: ForwardProcess) -> DenoiseFn:
    """Guide with two separate denoisers (e.g. to compose with other wrappers)."""
    return lambda x_t, t: combine_guided(cond(x_t, t), uncond(x_t, t), w, x_t, t, process)


def batched_classifier_free(denoise: ConditionalDenoiseFn, w: float, cond: dict[str, Tensor],
                            null_cond: dict[str, Tensor], process: ForwardProcess) -> DenoiseFn:
    """Classifier-free guidance with the conditional and unconditional passes in one batched forward.

    Args:
        denoise: A conditional denoiser trained with condition dropout, called as ``denoise(x_t, t, **cond)``
            (e.g. ``Denoiser.bind()``).
        w: Guidance weight (0: conditional, larger: sharper adherence to the condition).
        cond: The conditioning keyword arguments, batched like x_t (e.g. ``{"y": labels}``).
        null_cond: The "no condition" arguments, same shapes (e.g. ``{"y": null labels}``).
        process: The forward process (x0 is recomputed from the guided eps).
    """
    both = {key: torch.cat([cond[key], null_cond[key]]) for key in cond}

    def guided(x_t: Tensor, t: Tensor) -> Prediction:
        pred = denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), **both)
        n = x_t.shape[0]
        log_var = None if pred.log_var is None else pred.log_var[:n]
        c = Prediction(x0=pred.x0[:n], eps=pred.eps[:n], log_var=log_var)
        u = Prediction(x0=pred.x0[n:], eps=pred.eps[n:])
        return combine_guided(c, u, w, x_t, t, process)

    return guided
