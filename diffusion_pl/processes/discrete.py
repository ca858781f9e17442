"""Discrete-time DDPM forward process (Ho et al. 2020) with integer steps t in 1..T."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.schedules import ScheduleName, make_betas, rescale_zero_terminal_snr

FixedVariance = Literal["beta", "posterior"]


class DiscreteProcess(ForwardProcess):
    """DDPM: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 1..T (Ho et al. 2020, eq. 2).

    Tables are indexed by the integer step; index 0 is the clean data (alpha-bar_0 = 1), so
    ``alpha_bar[t - 1]`` is always defined. Tables are computed in float64 and stored in float32.

    Non-integer times: the marginal coefficients (:meth:`alpha`, :meth:`sigma`, :meth:`alpha_bar`) and
    :meth:`net_input_time` also take a floating-point t in [0, T], the continuous process of :meth:`log_snr`
    (linear in log-SNR between integer steps), which equals the tables at integer steps; the samplers of
    :mod:`diffusion_pl.samplers.edm` visit such times. An integer tensor indexes the tables as before; the
    step-wise quantities (beta, the posterior, the fixed variances) take integer steps only.

    Args:
        num_steps: T, the number of diffusion steps.
        schedule: Beta schedule name: linear, cosine, quadratic or constant.
        beta_start: First beta of the linear/quadratic schedule (at T = 1000).
        beta_end: Last beta of the linear/quadratic schedule (at T = 1000).
        cosine_s: Offset s of the cosine schedule.
        betas: Explicit betas (overrides ``schedule``); used for respaced sub-sequences. Each lies in (0, 1); the
            last may be 1 (alpha-bar_T = 0, as a respaced zero-terminal-SNR process keeps it).
        timestep_map: For a respaced process, the original step of each new step (``net_input_time``).
        zero_terminal_snr: Rescale the betas to alpha-bar_T = 0 (Lin et al. 2024, Alg. 1:
            :func:`~diffusion_pl.processes.schedules.rescale_zero_terminal_snr`), so that x_T is pure noise and the
            prior N(0, I) is exact. Then eps-prediction is undefined at T (x0 = (x_t - sigma eps) / alpha): train
            with ``V()`` (``X0()`` and ``Velocity()`` are defined there too) and sample from T (a ``Trailing`` grid).
    """

    def __init__(self, num_steps: int = 1000, schedule: ScheduleName = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, cosine_s: float = 0.008, betas: list[float] | None = None,
                 timestep_map: list[int] | None = None, zero_terminal_snr: bool = False) -> None:
        super().__init__()
        betas64 = torch.tensor(betas, dtype=torch.float64) if betas is not None else make_betas(
            schedule, num_steps, beta_start, beta_end, cosine_s)
        inner = betas64[:-1]
        if not (len(betas64) > 0 and bool(((inner > 0) & (inner < 1)).all()) and 0 < float(betas64[-1]) <= 1):
            raise ValueError("every beta must lie in (0, 1) (the last may be 1: alpha-bar_T = 0); check the schedule's "
                             "beta_start/beta_end for this T")
        if zero_terminal_snr:
            betas64 = rescale_zero_terminal_snr(betas64)
        self.num_steps = len(betas64)
        step_map = timestep_map if timestep_map is not None else list(range(self.num_steps + 1))
        if len(step_map) != self.num_steps + 1:
            raise ValueError(f"timestep_map needs T + 1 = {self.num_steps + 1} entries (step 0 included)")
        self.register_buffer("timestep_map", torch.tensor(step_map, dtype=torch.float32), persistent=False)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas64, 0)])
        beta = torch.cat([torch.zeros(1, dtype=torch.float64), betas64])
        posterior_var = beta[1:] * (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:])
        # Nichol & Dhariwal's clipping: beta-tilde_1 = 0, so log-variance at t = 1 takes beta-tilde_2.
        posterior_var_clipped = torch.cat([posterior_var[1:2], posterior_var[1:]]) if self.num_steps > 1 else beta[1:]
        self._register("betas", beta)
        self._register("alphas_cumprod", alpha_bar)
        self.alphas_cumprod_64 = alpha_bar
        self._register("posterior_variance", torch.cat([torch.zeros(1, dtype=torch.float64), posterior_var]))
        self._register("posterior_log_variance_clipped",
                       torch.cat([torch.zeros(1, dtype=torch.float64), posterior_var_clipped.log()]))
        # log beta_t, with beta-tilde_2 at t = 1 (as improved-diffusion's "fixedlarge"; beta_1 is tiny).
        self._register("log_betas_clipped", torch.cat([
            torch.zeros(1, dtype=torch.float64), posterior_var_clipped[:1].log(), betas64[1:].log()]))
        self._register("posterior_coef_x0", torch.cat([
            torch.zeros(1, dtype=torch.float64), beta[1:] * alpha_bar[:-1].sqrt() / (1 - alpha_bar[1:])]))
        self._register("posterior_coef_xt", torch.cat([
            torch.zeros(1, dtype=torch.float64), (1 - alpha_bar[:-1]) * (1 - beta[1:]).sqrt() / (1 - alpha_bar[1:])]))

    def _register(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value.float(), persistent=False)

    def _gather(self, table: Tensor, t: Tensor) -> Tensor:
        return table[t.long()]

    def alpha(self, t: Tensor) -> Tensor:
        """sqrt(alpha-bar_t) (at a non-integer t, sqrt(sigmoid(lambda(t))) of :meth:`log_snr`)."""
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        """sqrt(1 - alpha-bar_t) (at a non-integer t, sqrt(sigmoid(-lambda(t))), accurate where alpha-bar is near 1)."""
        if not t.is_floating_point():
            return (1 - self._gather(self.alphas_cumprod, t)).sqrt()
        exact = (1 - self._gather(self.alphas_cumprod, t).to(t.dtype)).sqrt()
        return torch.where(t == t.floor(), exact, torch.sigmoid(-self.log_snr(t)).sqrt())

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha-bar_t = prod_{s <= t} (1 - beta_s); alpha-bar_0 = 1 (at a non-integer t, sigmoid(lambda(t)))."""
        if not t.is_floating_point():
            return self._gather(self.alphas_cumprod, t)
        exact = self._gather(self.alphas_cumprod, t).to(t.dtype)
        return torch.where(t == t.floor(), exact, torch.sigmoid(self.log_snr(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha-bar / (1 - alpha-bar)) at a real time t in [0, T], in t's floating dtype.

        The one definition of the process between its integer steps. For i <= t <= i + 1 with i >= 1, lambda is
        linear between the steps' log-SNRs, lambda(t) = (i + 1 - t) lambda_i + (t - i) lambda_{i+1}; on (0, 1),
        where lambda_0 = +inf, the EDM noise level sigma/alpha = exp(-lambda/2) is linear instead,
        sigma/alpha(t) = t sigma/alpha(1), i.e. lambda(t) = lambda_1 - 2 log t (+inf at t = 0). Both are
        continuous and strictly decreasing, so alpha-bar = sigmoid(lambda) falls strictly from 1 at t = 0 and
        equals the table at every integer step (Kingma et al. 2021 parameterize a process by lambda(t) the same way).
        Mirrored at the top of a zero-terminal-SNR process (lambda_T = -inf, Lin et al. 2024): on (T - 1, T] the
        square root of the SNR, alpha/sigma = exp(lambda/2), is linear instead, falling to 0 at T, i.e.
        lambda(t) = lambda_{T-1} + 2 log(T - t). Computed on t's device (a sampler's time grid is built on the CPU,
        whatever the process's device).
        """
        t = t.float() if not t.is_floating_point() else t
        t = t.clamp(0, self.num_steps)
        low = t.floor().long().clamp(max=self.num_steps - 1)
        alpha_bar = self.alphas_cumprod.to(device=t.device, dtype=t.dtype)
        lam_high = _logit(alpha_bar[low + 1])
        lam_low = torch.where(low == 0, lam_high, _logit(alpha_bar[low]))
        frac = t - low
        linear = lam_low + frac * (lam_high - lam_low)
        inner = torch.where(lam_high == -math.inf, lam_low + 2 * (1 - frac).log(), linear)
        return torch.where(low == 0, lam_high - 2 * t.log(), inner)

    def beta(self, t: Tensor) -> Tensor:
        """beta_t for integer steps t in 1..T."""
        return self._gather(self.betas, t)

    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """t ~ Uniform{1, ..., T} (Ho et al. 2020, Alg. 1)."""
        return torch.randint(1, self.num_steps + 1, (n,), device=device, generator=generator)

    def net_input_time(self, t: Tensor) -> Tensor:
        """The (original, for a respaced process) integer step, as float, is what the UNet embeds; a non-integer t
        maps linearly between the steps of its neighbours (t itself when the process is not respaced)."""
        if not t.is_floating_point():
            return self.timestep_map[t.long()]
        low = t.clamp(0, self.num_steps).floor().long().clamp(max=self.num_steps - 1)
        step_map = self.timestep_map.to(t.dtype)
        return step_map[low] + (t - low) * (step_map[low + 1] - step_map[low])

    def probe_times(self) -> Tensor:
        """Every step 1..T."""
        return torch.arange(1, self.num_steps + 1, device=self.betas.device)

    def fixed_log_variance(self, t: Tensor, kind: FixedVariance = "beta") -> Tensor:
        """Fixed reverse log-variance: log beta_t ("beta") or log beta-tilde_t ("posterior"), both using
        beta-tilde_2 at t = 1 (Ho et al. 2020, Sec. 3.2; Nichol & Dhariwal 2021, Sec. 3.1)."""
        table = self.log_betas_clipped if kind == "beta" else self.posterior_log_variance_clipped
        return self._gather(table, t)

    def interpolated_log_variance(self, frac: Tensor, t: Tensor) -> Tensor:
        """Learned variance Sigma = exp(v log beta_t + (1 - v) log beta-tilde_t) (Nichol & Dhariwal 2021, eq. 15),
        with ``frac`` = v in [0, 1] per element and the same clipping at t = 1 as :meth:`fixed_log_variance`."""
        upper = append_dims(self._gather(self.log_betas_clipped, t), frac.ndim)
        lower = append_dims(self._gather(self.posterior_log_variance_clipped, t), frac.ndim)
        return frac * upper + (1 - frac) * lower

    def respace(self, steps: Sequence[int]) -> DiscreteProcess:
        """The process restricted to the increasing steps ``steps`` (a sub-sequence of 1..T ending anywhere).

        The new betas are beta'_i = 1 - alpha-bar_{s_i} / alpha-bar_{s_{i-1}} (s_0 = 0), so alpha-bar is unchanged
        on the kept steps, and ``net_input_time`` still gives the network the original step (Nichol & Dhariwal
        2021, Sec. 4).
        """
        kept = [0, *[int(s) for s in steps]]
        if any(b <= a for a, b in zip(kept, kept[1:])) or kept[-1] > self.num_steps:
            raise ValueError(f"respacing steps must increase strictly within 1..{self.num_steps}, got {list(steps)}")
        alpha_bar = self.alphas_cumprod_64
        betas = [float(1 - alpha_bar[b] / alpha_bar[a]) for a, b in zip(kept, kept[1:])]
        original = [int(self.timestep_map[s]) for s in kept]
        return DiscreteProcess(betas=betas, timestep_map=original).to(self.betas.device)

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).

        mu-tilde = sqrt(alpha-bar_{t-1}) beta_t / (1 - alpha-bar_t) x0
                   + sqrt(alpha_t) (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) x_t,
        beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t.
        """
        mean = (append_dims(self._gather(self.posterior_coef_x0, t), x_t.ndim) * x0
                + append_dims(self._gather(self.posterior_coef_xt, t), x_t.ndim) * x_t)
        return mean, self._gather(self.posterior_log_variance_clipped, t)

    def posterior_variance_at(self, t: Tensor) -> Tensor:
        """beta-tilde_t (unclipped; zero at t = 1)."""
        return self._gather(self.posterior_variance, t)


def _logit(p: Tensor) -> Tensor:
    """log(p / (1 - p)), +inf at p = 1."""
    return p.log() - (-p).log1p()
