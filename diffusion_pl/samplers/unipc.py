"""UniPC (Zhao et al. 2023): the unified predictor UniP and corrector UniC, multistep, in DPM-Solver++'s data
prediction, on the EDM form x~ = x / alpha, sigma~ = sigma / alpha of any forward process (see
:mod:`~diffusion_pl.samplers.edm`; the solver calls the DenoiseFn and reads alpha and sigma, nothing else).

In lambda = -log sigma~, with D_k the data estimate at the grid's time t_k, a step from t to s (h = lambda_s -
lambda_t > 0) of either is DPM-Solver++'s first-order update (DDIM; Lu et al. 2022b) with a corrected estimate:

    x~_s = e^{-h} x~_t - (e^{-h} - 1) D',   D' = D_t + sum_k rho_k (D_k - D_t) / r_k,   r_k = (lambda_k - lambda_t) / h.

UniP-p sums over the p - 1 estimates before t (order p); UniC-p over those and the estimate at s itself (r = 1), the
one the next step evaluates anyway, so correcting costs no evaluation and raises the order by one (Zhao et al. 2023,
Sec. 3.1-3.2). B(h) = e^{-h} - 1 (the paper's B_2(h) = e^h - 1, "bh2", written for data prediction) cancels against the
first-order factor, and the rho_k solve the order conditions R a = phi / B(h) of the paper's Theorem 3.1:

    sum_k rho_k r_k^{m-1} = m! phi_{m+1}(-h) / phi_1(-h),   m = 1..K,   phi_1(z) = (e^z - 1) / z,
    phi_{m+1}(z) = (phi_m(z) - 1/m!) / z;

a single term takes rho = 1/2, the h -> 0 limit (the official code's choice, which makes UniP-2 DPM-Solver++(2M) and
UniC-1 the exponential trapezoid rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.tensors import append_dims
from diffusion_pl.parameterization import DenoiseFn
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.noise_levels import process_log_snr
from diffusion_pl.samplers.edm import _finish, _steps, noise_level
from diffusion_pl.samplers.grids import grid_times

#: The orders UniPC is offered at: UniP-p with UniC-p (the official code and diffusers' solver_order 1-3).
UNIPC_ORDERS = (1, 2, 3)

Estimate = tuple[float, Tensor]
"""(lambda_k, D_k): -log sigma~ at a grid time and the denoiser's data estimate there."""


def check_unipc_order(order: int) -> None:
    """Raise unless ``order`` is one of :data:`UNIPC_ORDERS`."""
    if order not in UNIPC_ORDERS:
        raise ValueError(f"UniPC order must be one of {', '.join(map(str, UNIPC_ORDERS))}, got {order}")


def step_orders(grid: Tensor, order: int) -> list[int]:
    """The predictor's order p_i of each step i of ``grid``: min(order, i + 1) (a multistep start, one estimate more
    per step), and on a grid ending at the data also at most N - i (diffusers' and the official code's
    lower_order_final): the step to sigma~ = 0 is first order (x = D, as in DPM-Solver++(2M)), the one before it at
    most second order. A grid stopping above the data keeps the full order to its end."""
    times = grid_times(grid, "UniPC")
    steps = len(times) - 1
    return [min(order, i + 1, steps - i if times[-1] == 0 else order) for i in range(steps)]


def grid_lambdas(process: ForwardProcess, grid: Tensor) -> list[float]:
    """lambda = -log sigma~ = log-SNR / 2 at each time of ``grid``, from the process's float64 log-SNR (the entry of
    a final t = 0 is not used)."""
    return (0.5 * process_log_snr(process, grid.detach().cpu().double())).tolist()


def order_condition_sides(h: float, count: int) -> list[float]:
    """m! phi_{m+1}(-h) / phi_1(-h) for m = 1..``count`` (module docstring; in float64, where the phi recursion's
    cancellation, like 1 / h^m, stays small)."""
    z = -h
    phi_1 = math.expm1(z) / z
    phi, factorial, sides = phi_1, 1.0, []
    for m in range(1, count + 1):
        phi = (phi - 1.0 / factorial) / z
        sides.append(factorial * phi / phi_1)
        factorial *= m + 1
    return sides


def unipc_coefficients(r: Sequence[float], h: float) -> list[float]:
    """rho_k for the nodes ``r`` of a step of size ``h``: the Vandermonde system sum_k rho_k r_k^{m-1} =
    m! phi_{m+1}(-h) / phi_1(-h), m = 1..K (Zhao et al. 2023, Theorem 3.1 with B(h) = e^{-h} - 1), or 1/2 for K = 1."""
    if len(r) == 1:
        return [0.5]
    vandermonde = torch.tensor([[r_k**m for r_k in r] for m in range(len(r))], dtype=torch.float64)
    sides = torch.tensor(order_condition_sides(h, len(r)), dtype=torch.float64)
    return torch.linalg.solve(vandermonde, sides).tolist()


def unipc_update(x_tilde: Tensor, lambda_s: float, history: Sequence[Estimate], estimate_s: Tensor | None) -> Tensor:
    """One UniP (``estimate_s`` None) or UniC (``estimate_s`` the data estimate at s) update of the module docstring
    from x~ at the time of ``history[-1]`` to the level ``lambda_s``, over the estimates of ``history`` (oldest first;
    UniP-p and UniC-p take p of them)."""
    lambda_t, data_t = history[-1]
    h = lambda_s - lambda_t
    nodes = [((lambda_k - lambda_t) / h, data_k) for lambda_k, data_k in history[:-1]]
    if estimate_s is not None:
        nodes.append((1.0, estimate_s))
    data = data_t
    if nodes:
        rho = unipc_coefficients([r_k for r_k, _ in nodes], h)
        for rho_k, (r_k, data_k) in zip(rho, nodes):
            data = data + rho_k / r_k * (data_k - data_t)
    return math.exp(-h) * x_tilde - math.expm1(-h) * data


@torch.no_grad()
def sample_unipc(denoise: DenoiseFn, process: ForwardProcess, x_T: Tensor, *, grid: Tensor, order: int = 2,
                 project: ProjectFn | None = None,
                 generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """UniPC-p (Zhao et al. 2023, bh2, data prediction; update in the module docstring), one evaluation per step.

    Step i evaluates D at x_{t_i}; from step 1 on, UniC-p_{i-1} first corrects x~_{t_i} with it (so the last step is
    not corrected), then UniP-p_i (:func:`step_orders`) predicts x_{t_{i+1}}, which ``project`` maps. The corrected
    sample is not projected again: as in diffusers' UniPCMultistepScheduler, the projection (and an observer) sees the
    predictor's sample, at which the next evaluation is made. A step to the data is x = D there, uncorrected (a
    correction at that level would go unused). UniPC-p is of order p + 1 (UniC adds one to UniP's).

    Args:
        denoise: (x_t, t) -> Prediction under ``process`` (guided or not; only its x0 is used).
        process: The forward process.
        x_T: Sample at the grid's first time.
        grid: Strictly decreasing times t_0 > ... > t_end >= 0 (float, or integer steps); output at t_end.
        order: p, 1, 2 or 3.
        project: Optional (x, s) -> x applied after every step (inpainting by replacement).
        generator: Unused (the solver is deterministic); taken for a uniform signature.
        progress: Show a progress bar.

    Returns:
        The sample at the grid's last time.
    """
    check_unipc_order(order)
    orders, lambdas = step_orders(grid, order), grid_lambdas(process, grid)
    x, history, pending = x_T, [], None  # pending: (x~ at the last step's start, its p), UniC's other inputs
    for i, (t, s) in enumerate(_steps(grid, "UniPC", x_T, progress)):
        alpha_s, sigma_s = noise_level(process, s)
        x0_hat = denoise(x, t).x0
        if not bool((sigma_s > 0).all()):
            x = _finish(append_dims(alpha_s, x.ndim) * x0_hat, s, project)
            continue
        x_tilde = x / append_dims(process.alpha(t), x.ndim)
        if pending is not None:
            x_tilde = unipc_update(pending[0], lambdas[i], history[-pending[1]:], x0_hat)
        history = [*history, (lambdas[i], x0_hat)][-order:]
        pending = (x_tilde, orders[i])
        x_tilde = unipc_update(x_tilde, lambdas[i + 1], history[-orders[i]:], None)
        x = _finish(append_dims(alpha_s, x.ndim) * x_tilde, s, project)
    return x
