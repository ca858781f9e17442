"""Stateless sampling functions over a denoiser (the time grid is an argument, not hidden state) and the typed
sampler configurations that check a process, build its default grid and call them."""

from diffusion_pl.core.project import ProjectFn
from diffusion_pl.parameterization import probability_flow
from diffusion_pl.processes.ode import integrate_ode
from diffusion_pl.samplers.configs import (
    DDIM,
    DDPM,
    ODE,
    DPMSolverPP,
    DPMSolverPPSDE,
    EDMStochastic,
    Euler,
    EulerMaruyama,
    Heun,
    PredictorCorrector,
    Sampler,
    UniPC,
)
from diffusion_pl.samplers.ddim import invert_ddim, sample_ddim
from diffusion_pl.samplers.ddpm import ddpm_step, sample_ddpm
from diffusion_pl.samplers.edm import sample_dpmpp_2m, sample_euler, sample_heun
from diffusion_pl.samplers.edm_sde import sample_dpmpp_2m_sde, sample_edm_stochastic
from diffusion_pl.samplers.grids import (
    append_zero,
    ddpm_grid,
    sde_times,
    strided_grid,
    strided_steps,
)
from diffusion_pl.samplers.observe import OnStepFn, observed
from diffusion_pl.samplers.ode import encode_ode, sample_ode
from diffusion_pl.samplers.sde import sample_euler_maruyama, sample_pc
from diffusion_pl.samplers.timegrids import Karras, LogSNR, TimeGrid, Trailing, Uniform
from diffusion_pl.samplers.unipc import sample_unipc

__all__ = [
    "DDIM", "DDPM", "ddpm_step", "ODE", "EulerMaruyama", "PredictorCorrector", "ProjectFn", "Sampler",
    "append_zero", "ddpm_grid", "encode_ode", "invert_ddim", "integrate_ode", "probability_flow", "sample_ddim", "sample_ddpm",
    "sample_euler_maruyama", "sample_ode", "sample_pc", "sde_times", "strided_grid", "strided_steps",
    "DPMSolverPP", "Euler", "Heun", "Karras", "LogSNR", "OnStepFn", "TimeGrid", "Trailing", "Uniform",
    "sample_dpmpp_2m", "sample_euler", "sample_heun", "DPMSolverPPSDE", "EDMStochastic", "sample_dpmpp_2m_sde",
    "sample_edm_stochastic", "observed", "UniPC", "sample_unipc",
]
