"""An observe-only per-step callback for every sampler (like k-diffusion's ``callback``): record the trajectory and
the data estimates of a sampling run without changing it."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from diffusion_pl.core.project import ProjectFn
from diffusion_pl.parameterization import DenoiseFn, Prediction

OnStepFn = Callable[[int, Tensor, Tensor, Tensor], None]
"""(i, t, x, x0_hat) -> None, called after step i: t the (B,) time reached, x the sample there (after any
projection), x0_hat the denoiser's data estimate at the step's start (its first evaluation in the step). Observe
only: it must not change x."""


def observed(denoise: DenoiseFn, project: ProjectFn | None, on_step: OnStepFn) -> tuple[DenoiseFn, ProjectFn]:
    """The denoiser and per-step projection to hand a sampler so that ``on_step`` sees each of its steps: the
    projection runs after every step (the samplers' contract), so it reports the step, after ``project`` if any."""
    first_estimate: list[Tensor] = []
    steps_done = [0]

    def denoise_and_remember(x: Tensor, t: Tensor) -> Prediction:
        prediction = denoise(x, t)
        if not first_estimate:
            first_estimate.append(prediction.x0)
        return prediction

    def project_and_report(x: Tensor, t: Tensor) -> Tensor:
        x = x if project is None else project(x, t)
        on_step(steps_done[0], t, x, first_estimate.pop() if first_estimate else x)
        steps_done[0] += 1
        return x

    return denoise_and_remember, project_and_report
