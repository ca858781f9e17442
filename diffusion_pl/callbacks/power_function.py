"""Power-function EMA profiles and their post-hoc combination (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models" (EDM2), Sec. 3 and App. C). No Lightning here.

After t training steps a power-function average weighs the weights of step tau with the profile
p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 < tau <= t. Its width relative to the training time,
sigma_rel (eq. 3), names the average; gamma > 0 keeps sigma_rel in (0, 12^-1/2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: sigma_rel of gamma = 0 (a uniform average over the whole run): every gamma > 0 gives a smaller one.
MAX_SIGMA_REL = 12 ** -0.5


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = ((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))^(1/2), the profile's standard deviation relative to t
    (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma > 0 of ``sigma_rel``: eq. 3 squared is the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s = 0
    with s = sigma_rel^-2, whose largest real root it is (EDM2 App. C.2, Algorithm 2).

    Raises:
        ValueError: ``sigma_rel`` outside (0, :data:`MAX_SIGMA_REL`).
    """
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}) (a power-function profile with gamma > 0, "
                         f"EDM2 eq. 3), got {sigma_rel}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def update_weight(t: int, gamma: float) -> float:
    """1 - beta_t of the step-t update theta_avg <- beta_t theta_avg + (1 - beta_t) theta, where
    beta_t = (1 - 1/t)^(gamma + 1) (EDM2 eq. 127 with one step per unit of time): after t steps the average weighs
    step tau's weights by (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), the profile integrated over the step.
    Computed as -expm1((gamma + 1) log1p(-1/t)), exact at large t; 1 at t = 1 (the first weights are copied)."""
    if t == 1:
        return 1.0
    return -math.expm1((gamma + 1) * math.log1p(-1.0 / t))


@dataclass
class PowerAverage:
    """One power-function average: its sigma_rel, gamma and weights (named tensors, averaged in place)."""

    sigma_rel: float
    gamma: float
    weights: dict[str, Tensor]

    @classmethod
    def of(cls, sigma_rel: float, weights: dict[str, Tensor]) -> PowerAverage:
        return cls(sigma_rel, sigma_rel_to_gamma(sigma_rel), weights)

    def update(self, current: Mapping[str, Tensor], t: int) -> None:
        """Average the weights of step ``t`` (1-based) in: theta_avg <- theta_avg + (1 - beta_t) (theta - theta_avg)."""
        names = list(self.weights)
        torch._foreach_lerp_([self.weights[name] for name in names], [current[name] for name in names],
                             update_weight(t, self.gamma))


def profile_inner_products(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral of the product of two profiles (EDM2 App. C.3), broadcast:
    (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_max) (t_min / t_max)^gamma_max, with gamma_max the
    exponent of the profile that reaches t_max (the other one ends first)."""
    t_max, t_min = torch.maximum(t_a, t_b), torch.minimum(t_a, t_b)
    gamma_max = torch.where(t_a >= t_b, gamma_a, gamma_b)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max) * (t_min / t_max) ** gamma_max


def posthoc_coefficients(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> Tensor:
    """The x minimising || sum_i x_i p_{t_i,gamma_i} - p_{step,gamma} ||^2 over the profiles of stored averages (EDM2
    App. C.3, Algorithm 3): the normal equations A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_target>, solved by least
    squares in float64 (A is a Gram matrix, badly conditioned when many snapshots are close), then scaled to sum to 1
    as the target profile integrates to 1.

    Returns:
        The coefficients (float64), one per stored average.
    """
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    gram = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    target = profile_inner_products(t, g, torch.tensor(float(step), dtype=torch.float64),
                                    torch.tensor(gamma, dtype=torch.float64))
    x = torch.linalg.lstsq(gram, target[:, None], driver="gelsd").solution[:, 0]
    return x / x.sum()
