"""A torch ODE integrator: dx/dt = fn(x, t) with fixed-step Euler or Heun, or adaptive Dormand–Prince 5(4)
(Dormand & Prince 1980; Hairer, Nørsett & Wanner, Sec. II.4-5), on the tensors' device; its only host
synchronization is one error norm per step. The probability-flow samplers and the ODE likelihood both use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from diffusion_pl.core.progress import maybe_progress
from diffusion_pl.core.project import ProjectFn
from diffusion_pl.core.tensors import batch_time

ODEFn = Callable[[Tensor, Tensor], Tensor]
ODEMethod = Literal["euler", "heun", "rk45"]
ODE_METHODS: tuple[str, ...] = ("euler", "heun", "rk45")
MAX_ADAPTIVE_STEPS = 100_000
log = logging.getLogger(__name__)

# Dormand–Prince 5(4) Butcher tableau. The 7th stage is evaluated at the accepted 5th-order solution
# (first same as last); _DP_ERROR holds b5 - b4, the weights of the embedded error estimate.
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_ERROR = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _combine(x: Tensor, h: float, weights: tuple[float, ...], ks: list[Tensor]) -> Tensor:
    """x + h sum_j w_j k_j, skipping zero weights."""
    out = x
    for w, k in zip(weights, ks):
        if w:
            out = out + (h * w) * k
    return out


def _error_norm(err: Tensor, x: Tensor, x_new: Tensor, rtol: float, atol: float) -> float:
    """max over samples of the RMS of err / (atol + rtol max(|x|, |x_new|)) (Hairer et al., eq. II.4.11)."""
    scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
    return (err / scale).flatten(1).pow(2).mean(1).sqrt().max().item()


def _dopri_step(fn: ODEFn, x: Tensor, t: float, h: float, k1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Dormand–Prince step of signed size h; returns (x_new, fn(x_new), local error estimate)."""
    ks = [k1]
    x_stage = x
    for c, a in zip(_DP_C, _DP_A):
        x_stage = _combine(x, h, a, ks)
        ks.append(fn(x_stage, batch_time(t + c * h, x)))
    return x_stage, ks[-1], _combine(torch.zeros_like(x), h, _DP_ERROR, ks)


def _initial_step(fn: ODEFn, x: Tensor, t0: float, t1: float, f0: Tensor, rtol: float, atol: float) -> float:
    """Starting step size from Hairer, Nørsett & Wanner, Sec. II.4 (as in scipy's solve_ivp); one evaluation."""
    direction = 1.0 if t1 > t0 else -1.0
    d0, d1 = _error_norm(x, x, x, rtol, atol), _error_norm(f0, x, x, rtol, atol)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = fn(x + direction * h0 * f0, batch_time(t0 + direction * h0, x))
    d2 = _error_norm(f1 - f0, x, x, rtol, atol) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    return min(100 * h0, h1, abs(t1 - t0))


def _integrate_adaptive(fn: ODEFn, x: Tensor, t0: float, t1: float, rtol: float, atol: float,
                        stats: dict[str, int]) -> Tensor:
    """Dormand–Prince 5(4) with local extrapolation and the step controller h <- h min(10, max(0.2, 0.9 err^-1/5))."""
    direction = 1.0 if t1 > t0 else -1.0
    k1 = fn(x, batch_time(t0, x))
    h = _initial_step(fn, x, t0, t1, k1, rtol, atol)
    t, nfe, accepted, rejected = t0, 2, 0, 0
    while t != t1:
        if accepted + rejected >= MAX_ADAPTIVE_STEPS or h <= 1e-12 * abs(t1 - t0):
            raise RuntimeError(f"adaptive ODE solver stalled at t={t:.6g} (step {h:.3g}) after {nfe} evaluations: "
                               "the drift may be non-finite or stiff; loosen rtol/atol or use method='heun'")
        last = h >= abs(t1 - t)
        h = abs(t1 - t) if last else h
        x_new, k_new, err = _dopri_step(fn, x, t, direction * h, k1)
        nfe += 6
        norm = _error_norm(err, x, x_new, rtol, atol)
        if norm <= 1.0:
            t, x, k1, accepted = (t1 if last else t + direction * h), x_new, k_new, accepted + 1
        else:
            rejected += 1
        factor = 10.0 if norm == 0 else 0.9 * norm**-0.2
        h *= min(10.0 if norm <= 1.0 else 1.0, max(0.2, factor))
    stats.update(nfe=nfe, steps=accepted, rejected=rejected)
    return x


def _integrate_fixed(fn: ODEFn, x: Tensor, times: Sequence[float], method: ODEMethod, progress: bool,
                     stats: dict[str, int], project: ProjectFn | None) -> Tensor:
    """Euler, or Heun's second-order method (explicit trapezoid), from ``times[0]`` through each of ``times``,
    projecting after every step."""
    pairs = list(zip(times[:-1], times[1:]))
    steps = len(pairs)
    for t, s in maybe_progress(pairs, progress, total=steps, desc=method):
        d = fn(x, batch_time(t, x))
        x_euler = x + (s - t) * d
        x = x_euler if method == "euler" else x + 0.5 * (s - t) * (d + fn(x_euler, batch_time(s, x)))
        x = x if project is None else project(x, batch_time(s, x))
    stats.update(nfe=steps * (1 if method == "euler" else 2), steps=steps, rejected=0)
    return x


def check_ode_method(method: str) -> None:
    """Raise unless ``method`` is one of :data:`ODE_METHODS`."""
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(ODE_METHODS)}")


def integrate_ode(fn: ODEFn, x: Tensor, t0: float, t1: float, *, method: ODEMethod = "rk45", steps: int = 100,
                  times: Sequence[float] | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                  progress: bool = False, stats: dict[str, int] | None = None,
                  project: ProjectFn | None = None) -> Tensor:
    """Solve dx/dt = fn(x, t) from t0 to t1 (either direction) and return x(t1).

    Args:
        fn: (x, t) -> dx/dt, with t a (B,) tensor on x's device and dtype.
        x: State at t0, batch first.
        t0: Start time.
        t1: End time.
        method: "euler", "heun" (fixed steps) or "rk45" (adaptive Dormand–Prince 5(4)).
        steps: Number of steps of the fixed-step methods, on a uniform grid (ignored by rk45).
        times: The grid of the fixed-step methods instead, t0 = times[0], ..., times[-1] = t1.
        rtol: Relative tolerance of rk45.
        atol: Absolute tolerance of rk45. The error is measured per sample (RMS over its elements) and the
            worst sample of the batch controls the shared step size.
        progress: Show a progress bar (fixed-step methods).
        stats: If given, receives "nfe" (evaluations of fn), "steps" (accepted) and "rejected".
        project: Optional (x, t) -> x applied after every step of the fixed-step methods, t the (B,) time just
            reached. rk45 refuses it: a projection between its stages would break its error estimate.

    Returns:
        x(t1).
    """
    check_ode_method(method)
    if method == "rk45" and project is not None:
        raise ValueError("a per-step projection or observer needs a fixed-step ODE method: use method='heun' or 'euler' "
                         "(rk45 adapts its steps to an error estimate that a projection would invalidate)")
    stats = {} if stats is None else stats
    if method == "rk45":
        out = _integrate_adaptive(fn, x, float(t0), float(t1), rtol, atol, stats)
    else:
        if times is None:
            if steps < 1:
                raise ValueError(f"the number of ODE steps must be at least 1, got {steps}")
            times = torch.linspace(float(t0), float(t1), steps + 1, dtype=torch.float64).tolist()
        if len(times) < 2 or (times[0], times[-1]) != (float(t0), float(t1)):
            raise ValueError(f"the ODE time grid must run from t0 = {t0} to t1 = {t1} in at least one step")
        out = _integrate_fixed(fn, x, times, method, progress, stats, project)
    log.debug("integrated the ODE from t=%g to t=%g with %s: %s", t0, t1, method, stats)
    return out
