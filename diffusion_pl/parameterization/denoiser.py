"""Denoiser: a network, the process it was trained on and its parameterization, called as (x_t, t) -> Prediction."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from diffusion_pl.parameterization.parts import Eps, Parameterization
from diffusion_pl.parameterization.prediction import ConditionalDenoiseFn, Prediction
from diffusion_pl.processes.base import ForwardProcess


class Denoiser(nn.Module):
    """Wrap a network so that ``denoiser(x_t, t, **cond)`` returns a :class:`Prediction`: the network is called as
    ``net(parameterization.net_input(x_t), parameterization.net_time(t), **cond)`` and its output converted by the
    parameterization.

    Args:
        net: The network.
        process: The forward process the network was trained on (or a respaced version of it).
        parameterization: What the network outputs (default ``Eps()``).
    """

    def __init__(self, net: nn.Module, process: ForwardProcess, parameterization: Parameterization | None = None) -> None:
        super().__init__()
        parameterization = parameterization if parameterization is not None else Eps()
        if not isinstance(parameterization, Parameterization):
            raise ValueError(f"a Denoiser takes a Parameterization part (Eps(), X0(), V(), Velocity(), EDM(), "
                             f"LearnedVariance(...)), got {parameterization!r}")
        parameterization.check(process)
        self.net = net
        self.process = process
        self.parameterization = parameterization

    def forward(self, x_t: Tensor, t: Tensor, **cond: Any) -> Prediction:
        p, process = self.parameterization, self.process
        output = self.net(p.net_input(x_t, t, process), p.net_time(t, process), **cond)
        return p.prediction(output, x_t, t, process)

    def with_process(self, process: ForwardProcess) -> Denoiser:
        """The same network under another process, e.g. a respaced sub-sequence of this one."""
        return Denoiser(self.net, process, self.parameterization)

    def bind(self, **cond: Any) -> ConditionalDenoiseFn:
        """A :data:`DenoiseFn` with conditioning (labels, low-res images, ...) fixed in a closure; called with
        keyword arguments, those replace the bound ones (classifier-free guidance passes cond and null at once)."""
        return lambda x_t, t, **override: self(x_t, t, **(override or cond))
