"""Forward processes: one interface for discrete DDPM and continuous-time SDEs."""

from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.processes.discrete import DiscreteProcess
from diffusion_pl.processes.schedules import SCHEDULES, make_betas

__all__ = ["ForwardProcess", "DiscreteProcess", "SCHEDULES", "make_betas"]

from diffusion_pl.processes.sde import SDEProcess, SubVPSDE, VESDE, VPSDE
from diffusion_pl.processes.flow import FlowProcess

__all__ += ["SDEProcess", "SubVPSDE", "VESDE", "VPSDE", "FlowProcess"]
