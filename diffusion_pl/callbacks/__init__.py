"""Callbacks shared by every model family: EMA and power-function EMA, sample grids, FID/KID, prediction writing,
exact-resume RNG state, checkpoints on SIGTERM and SLURM preemption, one directory per run; and the verified checkpoint
I/O plugin."""

from diffusion_pl.callbacks.checkpoint_io import VerifiedCheckpointIO
from diffusion_pl.callbacks.ema import EMA, averaged_module
from diffusion_pl.callbacks.fid import FID
from diffusion_pl.callbacks.power_ema import PowerEMA
from diffusion_pl.callbacks.preemption import SlurmRequeue, TerminationCheckpoint
from diffusion_pl.callbacks.reconstruction_grid import ReconstructionGrid
from diffusion_pl.callbacks.rng_state import ResumeRNGState
from diffusion_pl.callbacks.run_directory import RunDirectory
from diffusion_pl.callbacks.sample_grid import SampleGrid
from diffusion_pl.callbacks.sample_writer import SampleWriter
from diffusion_pl.callbacks.speed import TrainingSpeed
from diffusion_pl.callbacks.super_resolution import SuperResolutionMetrics

__all__ = ["EMA", "FID", "PowerEMA", "ReconstructionGrid", "ResumeRNGState", "RunDirectory", "SampleGrid",
           "SampleWriter", "SlurmRequeue", "SuperResolutionMetrics", "TerminationCheckpoint", "TrainingSpeed",
           "VerifiedCheckpointIO", "averaged_module"]
