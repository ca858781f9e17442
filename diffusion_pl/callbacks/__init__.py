"""Callbacks shared by every model family: EMA, sample grids, FID/KID, prediction writing, exact-resume RNG state,
SLURM preemption."""

from diffusion_pl.callbacks.ema import EMA, averaged_module
from diffusion_pl.callbacks.fid import FID
from diffusion_pl.callbacks.preemption import SlurmRequeue
from diffusion_pl.callbacks.rng_state import ResumeRNGState
from diffusion_pl.callbacks.sample_grid import SampleGrid
from diffusion_pl.callbacks.sample_writer import SampleWriter

__all__ = ["EMA", "FID", "ResumeRNGState", "SampleGrid", "SampleWriter", "SlurmRequeue", "averaged_module"]
