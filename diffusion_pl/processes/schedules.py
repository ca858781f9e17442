"""Beta schedules for discrete DDPM processes (Ho et al. 2020; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ScheduleName = Literal["linear", "cosine", "quadratic", "constant"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "quadratic", "constant")


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas from 1e-4 to 0.02 at T = 1000 (Ho et al. 2020, Sec. 4), rescaled by 1000 / T for other T."""
    scale = 1000.0 / num_steps
    return torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)


def quadratic_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas linear in sqrt(beta), as in Ho et al.'s released code ("quad")."""
    scale = 1000.0 / num_steps
    return torch.linspace((beta_start * scale) ** 0.5, (beta_end * scale) ** 0.5, num_steps, dtype=torch.float64) ** 2


def constant_betas(num_steps: int, beta: float | None = None) -> Tensor:
    """Constant beta; the default 0.02 * 1000 / T keeps alpha-bar_T near exp(-20) for any T."""
    value = beta if beta is not None else 0.02 * 1000.0 / num_steps
    return torch.full((num_steps,), value, dtype=torch.float64)


def cosine_alpha_bar(t_over_T: Tensor, s: float = 0.008) -> Tensor:
    """alpha-bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2) (Nichol & Dhariwal 2021, eq. 17)."""
    f = torch.cos((t_over_T + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """beta_t = 1 - alpha-bar(t) / alpha-bar(t-1), clipped at 0.999 (Nichol & Dhariwal 2021, Sec. 3.2)."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = cosine_alpha_bar(steps, s)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Alg. 1: the betas whose sqrt(alpha-bar) is that of ``betas`` shifted so that its last value is
    0 and scaled so that its first is unchanged, sqrt(alpha-bar'_t) = sqrt(alpha-bar_1) (sqrt(alpha-bar_t) -
    sqrt(alpha-bar_T)) / (sqrt(alpha-bar_1) - sqrt(alpha-bar_T)); hence alpha-bar'_T = 0 and beta'_T = 1 (zero terminal
    SNR: x_T is pure noise). Needs T >= 2 (float64 in, float64 out)."""
    if len(betas) < 2:
        raise ValueError(f"zero terminal SNR needs at least 2 steps (alpha-bar_1 is kept, alpha-bar_T set to 0), got "
                         f"{len(betas)}")
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0], root[-1]
    alpha_bar = ((root - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def make_betas(schedule: ScheduleName, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> Tensor:
    """Build the float64 betas beta_1..beta_T of a named schedule."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    if schedule == "linear":
        return linear_betas(num_steps, beta_start, beta_end)
    if schedule == "quadratic":
        return quadratic_betas(num_steps, beta_start, beta_end)
    if schedule == "cosine":
        return cosine_betas(num_steps, cosine_s)
    if schedule == "constant":
        return constant_betas(num_steps)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
