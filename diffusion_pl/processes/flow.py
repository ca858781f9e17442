"""The flow-matching (rectified flow) process: the linear interpolant x_t = (1 - t) x0 + t eps (Lipman et al. 2023;
Liu et al. 2023; the objective of SD3, Esser et al. 2024), as an SDE so that every sampler, the ODE likelihood and
the fast solvers run on it."""

from __future__ import annotations

from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.processes.sde import SDEProcess


class FlowProcess(SDEProcess):
    """x_t = (1 - t) x0 + t eps on t in [eps, 1 - end]: alpha(t) = 1 - t, sigma(t) = t, prior N(0, I).

    Its probability-flow ODE is dx/dt = E[eps - x0 | x_t], the velocity a ``Velocity()`` network learns. As an SDE
    with these marginals (Kingma et al. 2021, App. A; Song et al. 2021, eq. 5): f(t) = d log alpha / dt = -1 / (1 - t)
    and g(t)^2 = d sigma^2 / dt - 2 f sigma^2 = 2t / (1 - t), singular at t = 1, hence the last time 1 - ``end``
    (alpha there is ``end``: the prior N(0, I) stands for x_t of std ~ 1 - end around end x0).

    Args:
        eps: Smallest time t_min.
        end: 1 - t_max.
    """

    def __init__(self, eps: float = 1e-5, end: float = 1e-3) -> None:
        super().__init__(eps)
        if not 0.0 < end < 1.0 - eps:
            raise ValueError(f"the flow's end (1 - t_max) must lie in (0, 1 - eps), got {end}")
        self.end = float(end)
        self.t_max = 1.0 - self.end

    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = 1 - t."""
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = t."""
        return 1.0 * t

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """f = -x / (1 - t), g = sqrt(2t / (1 - t))."""
        return -x / append_dims(1.0 - t, x.ndim), (2 * t / (1.0 - t)).sqrt()
