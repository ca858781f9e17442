"""Stateless sampling functions over a denoiser: the time grid is an argument, not hidden state."""

from diffusion_pl.samplers.ddim import sample_ddim
from diffusion_pl.samplers.ddpm import sample_ddpm
from diffusion_pl.samplers.grids import strided_steps

__all__ = ["sample_ddim", "sample_ddpm", "strided_steps"]

from diffusion_pl.samplers.ode import encode_ode, integrate_ode, probability_flow, sample_ode
from diffusion_pl.samplers.sde import sample_euler_maruyama, sample_pc

__all__ += ["encode_ode", "integrate_ode", "probability_flow", "sample_ode", "sample_euler_maruyama", "sample_pc"]
