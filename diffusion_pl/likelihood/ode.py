"""Exact log-likelihoods from the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

For the ODE dx/dt = f~(x, t) (eq. 13), the instantaneous change of variables (Chen et al. 2018) gives
d log p_t(x(t)) / dt = -div f~(x(t), t), hence log p_{t_min}(x) = log p_1(x(1)) + int_{t_min}^1 div f~ dt
(eq. 39). The divergence is exact (autograd, one backward pass per dimension) or the Hutchinson–Skilling
estimate E_v[v^T (df~/dx) v] with probes v drawn once per call and held fixed along the trajectory.

Dequantization of 8-bit images (Theis et al. 2016; Ho et al. 2019) and the bits/dim constant:
integer pixels k in {0, ..., 255} become u = k + U[0, 1) in [0, 256), and the model sees y = u / 128 - 1 in
[-1, 1). The boxes [k / 128 - 1, (k + 1) / 128 - 1) tile [-1, 1) with side 1/128, so by Jensen
-log P(k) <= E_u[-log p(y)] + D log 128, i.e. bits/dim = (nll + D log 128) / (D ln 2) = nll / (D ln 2) + 7
(score_sde's offset of 7 for centered data). The repo's images are k / 127.5 - 1 (grid spacing 2/255); a
dequantization x + U(0, 2/255) on that grid would instead tile [-1, 1 + 2/255) with side 1/127.5 and the
constant would be log 127.5; :func:`bits_per_dim` takes the bin density as an argument for that case.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.core.tensors import sum_except_batch
from diffusion_pl.parameterization import DenoiseFn, probability_flow
from diffusion_pl.processes.ode import ODEFn, ODEMethod, integrate_ode
from diffusion_pl.processes.sde import SDEProcess

ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS: tuple[str, ...] = ("rademacher", "gaussian")
BINS_PER_UNIT = 128.0


def dequantize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniformly dequantize 8-bit images given as k / 127.5 - 1 (the data module's [-1, 1] scaling).

    Recovers k = round((x + 1) 127.5) and returns y = (k + U[0, 1)) / 128 - 1 in [-1, 1) (module docstring;
    float32 rounding of k + u can land on a bin's upper edge, a set of measure zero).

    Args:
        images: Images in [-1, 1] on the 8-bit grid k / 127.5 - 1.
        generator: Random generator on the images' device.

    Returns:
        Dequantized images, to be scored with ``bits_per_dim(..., bins_per_unit=128)``.
    """
    k = torch.round((images + 1) * 127.5).clamp(0, 255)
    u = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (k + u) / BINS_PER_UNIT - 1


def bits_per_dim(nll_nats: Tensor, num_dims: int, bins_per_unit: float = BINS_PER_UNIT) -> Tensor:
    """Discrete bits/dim from a continuous NLL: (nll + D log bins_per_unit) / (D ln 2) (module docstring).

    Args:
        nll_nats: Per-sample -log p(y) of the dequantized data, in nats.
        num_dims: D, the number of dimensions of one sample (e.g. 3 * 32 * 32).
        bins_per_unit: Integer bins per unit of the model's data space: 128 for [0, 256) -> [-1, 1)
            (:func:`dequantize`), 127.5 for x + U(0, 2/255) on the k / 127.5 - 1 grid.

    Returns:
        Per-sample bits/dim, an upper bound on the discrete data's code length.
    """
    return (nll_nats + num_dims * math.log(bins_per_unit)) / (num_dims * math.log(2))


def draw_probes(x: Tensor, kind: ProbeKind, num_probes: int, generator: torch.Generator | None) -> Tensor:
    """Hutchinson probes of shape (num_probes, *x.shape): Rademacher (+-1) or standard normal, E[v v^T] = I."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown Hutchinson probe {kind!r}; choose one of {', '.join(PROBE_KINDS)}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")
    shape = (num_probes, *x.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def autograd_divergence(dx: Tensor, x: Tensor) -> Tensor:
    """sum_i d dx_i / d x_i per sample, one backward pass per dimension (for low-dimensional data)."""
    flat = dx.flatten(1)
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for i in range(flat.shape[1]):
        grad = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
        div = div + grad.flatten(1)[:, i]
    return div


def hutchinson_divergence(dx: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """(1/K) sum_k v_k^T (d dx / dx) v_k per sample (Hutchinson 1990; Skilling 1989), one VJP per probe."""
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for v in probes:
        vjp = torch.autograd.grad(dx, x, v, retain_graph=True)[0]
        div = div + sum_except_batch(vjp * v)
    return div / probes.shape[0]


def _augmented(drift: ODEFn, shape: torch.Size, probes: Tensor | None) -> ODEFn:
    """d/dt [x, log-density increment] = [f~(x, t), div f~(x, t)] on states flattened to (B, D + 1)."""

    def fn(state: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x = state[:, :-1].reshape(shape).detach().requires_grad_(True)
            dx = drift(x, t)
            div = autograd_divergence(dx, x) if probes is None else hutchinson_divergence(dx, x, probes)
        return torch.cat([dx.detach().flatten(1), div.detach()[:, None]], dim=1)

    return fn


@torch.no_grad()
def ode_log_likelihood(denoise: DenoiseFn, process: SDEProcess, x: Tensor, *, method: ODEMethod = "rk45",
                       rtol: float = 1e-5, atol: float = 1e-5, steps: int = 1000,
                       hutchinson: ProbeKind = "rademacher", num_probes: int = 1,
                       generator: torch.Generator | None = None, exact_divergence: bool = False,
                       stats: dict[str, int] | None = None) -> Tensor:
    """Per-sample log p_{t_min}(x) in nats from the probability-flow ODE (Song et al. 2021, App. D.2, eq. 39).

    Integrates [x, delta] from t_min to 1 with d delta / dt = div f~ and returns log p_1(x(1)) + delta(1),
    where p_1 is the process's prior. The denoiser must be differentiable in x_t and treat the samples of a
    batch independently (no batch statistics), since divergences are taken through a batch-summed graph.
    For VE, p_{t_min} is the data density convolved with N(0, sigma(t_min)^2 I) (see :class:`VESDE`).

    Args:
        denoise: (x_t, t) -> Prediction.
        process: The SDE the denoiser was trained on.
        x: Data at t_min, batch first (dequantize images first, see :func:`dequantize`).
        method: ODE method (see :func:`~diffusion_pl.samplers.ode.integrate_ode`).
        rtol: Relative tolerance of rk45.
        atol: Absolute tolerance of rk45.
        steps: Steps of the fixed-step methods.
        hutchinson: Probe distribution of the trace estimator: "rademacher" or "gaussian".
        num_probes: Probes averaged per evaluation (one backward pass each).
        generator: Random generator for the probes, on x's device.
        exact_divergence: Use the exact divergence (D backward passes per evaluation) instead.
        stats: If given, receives the solver's statistics ("nfe" counts drift evaluations).

    Returns:
        Log-likelihoods of shape (B,), in nats (the NLL is its negative).
    """
    probes = None if exact_divergence else draw_probes(x, hutchinson, num_probes, generator)
    fn = _augmented(probability_flow(denoise, process), x.shape, probes)
    state = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], 1)], dim=1)
    state = integrate_ode(fn, state, process.t_min, process.t_max, method=method, steps=steps, rtol=rtol,
                          atol=atol, stats=stats)
    return process.prior_logp(state[:, :-1].reshape(x.shape)) + state[:, -1]
