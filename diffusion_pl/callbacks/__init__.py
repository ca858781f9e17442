"""Callbacks shared by every model family: EMA, sample grids, prediction writing, exact-resume RNG state."""

from diffusion_pl.callbacks.ema import EMA, averaged_module
from diffusion_pl.callbacks.preemption import SlurmRequeue
from diffusion_pl.callbacks.rng_state import ResumeRNGState
from diffusion_pl.callbacks.sample_grid import SampleGrid
from diffusion_pl.callbacks.sample_writer import SampleWriter

__all__ = ["EMA", "ResumeRNGState", "SampleGrid", "SampleWriter", "SlurmRequeue", "averaged_module"]
