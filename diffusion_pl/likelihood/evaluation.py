"""Likelihood metrics of a diffusion model at validation and test: the variational bound and the ODE likelihood."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion_pl.core.spec import Configurable
from diffusion_pl.likelihood.ode import bits_per_dim, dequantize, ode_log_likelihood
from diffusion_pl.likelihood.vlb import nats_to_bits_per_dim, variational_bound
from diffusion_pl.parameterization import Denoiser
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.discrete import DiscreteProcess, FixedVariance


class Likelihood(Configurable):
    """Which likelihoods a model logs: ``<stage>/bpd`` (the discrete variational bound, Ho et al. 2020 eq. 5, in
    bits/dim) and ``test/bpd_ode`` (the probability-flow ODE likelihood of dequantized images, Song et al. 2021,
    App. D.2).

    Args:
        val_bpd_terms: Network evaluations per validation batch of the stratified bound estimate (0: off).
        test_bpd_terms: Terms of the bound at test; None evaluates all T (the full bound), 0 turns it off.
        fixed_variance: The reverse variance in the bound when the model learns none: "beta" or "posterior".
        test_bpd_ode: Also log ``test/bpd_ode`` (SDE processes; Hutchinson trace, adaptive RK45).
        ode_options: Extra keyword arguments of ``ode_log_likelihood`` (method, rtol, atol, hutchinson, ...).
    """

    def __init__(self, val_bpd_terms: int = 0, test_bpd_terms: int | None = None, fixed_variance: FixedVariance = "beta",
                 test_bpd_ode: bool = False, ode_options: dict[str, Any] | None = None) -> None:
        if fixed_variance not in ("beta", "posterior"):
            raise ValueError(f"unknown fixed_variance {fixed_variance!r}; choose 'beta' or 'posterior'")
        self.val_bpd_terms = val_bpd_terms
        self.test_bpd_terms = test_bpd_terms
        self.fixed_variance = fixed_variance
        self.test_bpd_ode = test_bpd_ode
        self.ode_options = dict(ode_options or {})

    def check(self, process: ForwardProcess) -> None:
        """Refuse a validation bound on a process that has none."""
        if self.val_bpd_terms and not isinstance(process, DiscreteProcess):
            raise ValueError("val_bpd_terms estimates the discrete variational bound; for an SDE process set it to 0 "
                             "and use test_bpd_ode (probability-flow likelihood)")

    def bound_terms(self, stage: str, process: ForwardProcess) -> int | None:
        """Terms of the bound at ``stage`` (None: all T), or 0 when the stage logs no bound."""
        if not isinstance(process, DiscreteProcess):
            return 0
        return self.val_bpd_terms if stage == "val" else self.test_bpd_terms

    def metrics(self, stage: str, denoiser: Denoiser, cond: dict[str, Tensor], images: Tensor,
                generator: torch.Generator, seed: int) -> dict[str, Tensor]:
        """Mean bits/dim of ``images`` (B, ...) under the model: ``bpd`` (drawing from ``generator``) and, at test,
        ``bpd_ode`` when enabled (from a generator of its own seeded with ``seed``)."""
        out: dict[str, Tensor] = {}
        terms = self.bound_terms(stage, denoiser.process)
        if terms != 0:
            nats = variational_bound(denoiser.bind(**cond), denoiser.process, images, num_terms=terms,
                                     fixed_variance=self.fixed_variance, generator=generator)
            out["bpd"] = nats_to_bits_per_dim(nats, images[0].numel()).mean()
        if stage == "test" and self.test_bpd_ode:
            ode_generator = torch.Generator(device=images.device).manual_seed(seed)
            out["bpd_ode"] = self.ode_bits_per_dim(denoiser, cond, images, ode_generator)
        return out

    def ode_bits_per_dim(self, denoiser: Denoiser, cond: dict[str, Tensor], images: Tensor,
                         generator: torch.Generator) -> Tensor:
        """Mean bits/dim under the probability-flow ODE (needs autograd, even inside ``test``)."""
        with torch.inference_mode(False), torch.enable_grad():
            images = dequantize(images.clone(), generator)
            cond = {key: value.clone() for key, value in cond.items()}
            log_p = ode_log_likelihood(denoiser.bind(**cond), denoiser.process, images, generator=generator,
                                       **self.ode_options)
        return bits_per_dim(-log_p.detach(), images[0].numel()).mean()
