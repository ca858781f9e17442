"""Training losses. Each is a small module in the paper's notation (cf. NVlabs/edm training/loss.py).

A loss is called as ``loss(denoiser, x0, generator=None, **cond)`` and returns one value per sample. Where the
training times come from and how each time's error is weighted are parts of :class:`SimpleLoss`
(:mod:`diffusion_pl.loss_parts`).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffusion_pl.core.spec import Configurable
from diffusion_pl.core.tensors import mean_except_batch
from diffusion_pl.likelihood.vlb import vlb_term
from diffusion_pl.loss_parts import MinSNR, TimeDistribution, Weighting
from diffusion_pl.parameterization import Denoiser, Prediction

#: The weightings of earlier configs (``weighting: min_snr`` with ``min_snr_gamma``), mapped to parts.
LegacyWeighting = Literal["none", "min_snr"]


class DenoisingLoss(Configurable, nn.Module, abc.ABC):
    """Shared skeleton: draw t (and its importance weight), eps and x_t, run the denoiser, score the prediction."""

    def forward(self, denoiser: Denoiser, x0: Tensor, *, generator: torch.Generator | None = None,
                **cond: Any) -> Tensor:
        t, weight = self.sample_t(denoiser, x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = denoiser.process.add_noise(x0, t, eps)
        pred = denoiser(x_t, t, **cond)
        return weight * self.per_sample(denoiser, x0, eps, x_t, t, pred)

    def sample_t(self, denoiser: Denoiser, n: int, device: torch.device,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor | float]:
        """Training times and their weights 1 / (T p(t)) relative to the process's own distribution (1 here)."""
        return denoiser.process.sample_t(n, device, generator=generator), 1.0

    @abc.abstractmethod
    def per_sample(self, denoiser: Denoiser, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                   pred: Prediction) -> Tensor:
        """The loss of each sample given its noise, noised input, time and the denoiser's prediction."""


class SimpleLoss(DenoisingLoss):
    """L = E_{t, x0, eps} w(t) || target - F(x_t, t) ||^2, mean over pixels per sample; with the defaults L_simple
    (Ho et al. 2020, eq. 14 and Alg. 1). The target is the parameterization's (eps, x0, v, velocity, EDM's F).

    Args:
        times: Where the training times come from (default: the process's own, e.g. uniform steps);
            ``LogNormalSigma`` (EDM), ``LogitNormal`` (Esser et al. 2024).
        weighting: A weight lambda(t) of the x0 error, carried to the network's target by the parameterization
            (w = lambda f^2, f its :meth:`~diffusion_pl.parameterization.Parameterization.x0_error_scale`):
            ``MinSNR(gamma)`` (Hang et al. 2023), ``EDMWeighting(sigma_data)`` (Karras et al. 2022); None: w = 1.
            The strings "none" / "min_snr" of earlier configs still work ("min_snr" with ``min_snr_gamma``).
        min_snr_gamma: gamma of ``weighting: min_snr`` (earlier configs).
    """

    def __init__(self, weighting: Weighting | LegacyWeighting | None = None, min_snr_gamma: float = 5.0,
                 times: TimeDistribution | None = None) -> None:
        super().__init__()
        if isinstance(weighting, str):
            if weighting not in ("none", "min_snr"):
                raise ValueError(f"unknown loss weighting {weighting!r}; choose a Weighting part (MinSNR, "
                                 "EDMWeighting), or 'none' or 'min_snr'")
            weighting = MinSNR(min_snr_gamma) if weighting == "min_snr" else None
        self.weighting = weighting
        self.times = times

    def sample_t(self, denoiser: Denoiser, n: int, device: torch.device,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor | float]:
        if self.times is None:
            return super().sample_t(denoiser, n, device, generator)
        return self.times.sample(denoiser.process, n, device, generator), 1.0

    def per_sample(self, denoiser: Denoiser, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                   pred: Prediction) -> Tensor:
        target = denoiser.parameterization.target(x0, eps, t, denoiser.process)
        return mean_except_batch((pred.raw.float() - target.float()) ** 2) * self.weight(denoiser, t)

    def weight(self, denoiser: Denoiser, t: Tensor) -> Tensor | float:
        """Per-sample weight w(t) of the squared error in the network's target space."""
        if self.weighting is None:
            return 1.0
        scale = denoiser.parameterization.x0_error_scale(t, denoiser.process)
        return self.weighting.x0_weight(t, denoiser.process) * scale**2


def vlb_bits_per_dim(denoiser: Denoiser, x0: Tensor, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
    """L_{t-1} of each sample (KL for t > 1, discretized decoder NLL at t = 1) in bits per dimension."""
    return vlb_term(pred, denoiser.process, x0, x_t, t) / (x0[0].numel() * math.log(2.0))


class HybridLoss(SimpleLoss):
    """L_hybrid = L_simple + lambda L_vlb with a stop-gradient on the mean inside L_vlb, so L_vlb trains only the
    variance (Nichol & Dhariwal 2021, Sec. 3.1). L_vlb = T E_t[L_{t-1}] in bits/dim, so the per-sample term is
    lambda T L_{t-1} (lambda = 0.001, i.e. improved-diffusion's T / 1000 factor). Needs a learned variance."""

    def __init__(self, vlb_weight: float = 0.001, weighting: Weighting | LegacyWeighting | None = None,
                 min_snr_gamma: float = 5.0) -> None:
        super().__init__(weighting, min_snr_gamma)
        self.vlb_weight = vlb_weight

    def per_sample(self, denoiser: Denoiser, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                   pred: Prediction) -> Tensor:
        if pred.log_var is None:
            raise ValueError("HybridLoss trains a learned variance: set the net's learn_sigma: true and the "
                             "model's parameterization: LearnedVariance, or use SimpleLoss")
        frozen_mean = Prediction(x0=pred.x0.detach(), eps=pred.eps.detach(), log_var=pred.log_var)
        vlb = vlb_bits_per_dim(denoiser, x0, x_t, t, frozen_mean)
        return super().per_sample(denoiser, x0, eps, x_t, t, pred) + self.vlb_weight * denoiser.process.num_steps * vlb


class VLBLoss(DenoisingLoss):
    """Pure L_vlb = sum_t L_{t-1} in bits/dim, estimated from one t per sample as L_{t-1} / p(t).

    With ``importance_sampling``, p(t) is proportional to sqrt(E[L_{t-1}^2]) over the last ``history`` losses
    at each t, mixed with ``uniform_prob`` of the uniform law, once every t has a full history; uniform before
    that (Nichol & Dhariwal 2021, Sec. 3.3, eq. 18). The history is a buffer, so it is saved in checkpoints.
    """

    def __init__(self, importance_sampling: bool = True, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__()
        self.importance_sampling = importance_sampling
        self.history_size = history
        self.uniform_prob = uniform_prob
        self.register_buffer("loss_history", torch.zeros(0, history))
        self.register_buffer("history_count", torch.zeros(0, dtype=torch.long))

    def _ensure_history(self, num_steps: int, device: torch.device) -> None:
        if self.loss_history.shape[0] != num_steps:
            self.loss_history = torch.zeros(num_steps, self.history_size, device=device)
            self.history_count = torch.zeros(num_steps, dtype=torch.long, device=device)

    def step_probabilities(self, num_steps: int) -> Tensor:
        """p(t) for t = 1..T: uniform until warm, then proportional to the RMS of the recent losses."""
        uniform = torch.full((num_steps,), 1.0 / num_steps, device=self.loss_history.device)
        if not self.importance_sampling or self.loss_history.shape[0] != num_steps:
            return uniform
        if bool((self.history_count < self.history_size).any()):
            return uniform
        rms = self.loss_history.pow(2).mean(1).sqrt()
        return (1 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob * uniform

    def sample_t(self, denoiser: Denoiser, n: int, device: torch.device,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        num_steps = denoiser.process.num_steps
        self._ensure_history(num_steps, device)
        probs = self.step_probabilities(num_steps).to(device)
        index = torch.multinomial(probs, n, replacement=True, generator=generator)
        return index + 1, 1.0 / (num_steps * probs[index])

    def per_sample(self, denoiser: Denoiser, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                   pred: Prediction) -> Tensor:
        vlb = vlb_bits_per_dim(denoiser, x0, x_t, t, pred)
        if self.training:
            self._record(t, vlb.detach())
        return denoiser.process.num_steps * vlb

    @torch.no_grad()
    def _record(self, t: Tensor, losses: Tensor) -> None:
        """Push each sample's loss into its step's ring of the last ``history`` values."""
        for step, loss in zip((t - 1).tolist(), losses.float()):
            slot = int(self.history_count[step]) % self.history_size
            self.loss_history[step, slot] = loss
            self.history_count[step] += 1
