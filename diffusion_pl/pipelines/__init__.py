"""Multi-step inference with trained models, as plain functions: cascades, interpolation and inpainting."""

from diffusion_pl.pipelines.cascade import cascade
from diffusion_pl.pipelines.inpainting import INPAINT_METHODS, inpaint, repaint, repaint_schedule
from diffusion_pl.pipelines.interpolation import interpolate, interpolate_ddim, mix_noised, slerp
from diffusion_pl.pipelines.masks import MASK_NAMES, check_mask, load_mask, named_mask
from diffusion_pl.pipelines.model import (
    GenerativeModel,
    SamplingModel,
    run_sampler,
    sample_seeds,
    seeded_noise,
    start_grid,
)
from diffusion_pl.pipelines.tasks import Inpaint, Interpolate, PredictTask, SuperResolve, side_by_side
from diffusion_pl.pipelines.trajectory import Trajectory

__all__ = ["INPAINT_METHODS", "MASK_NAMES", "GenerativeModel", "Inpaint", "Interpolate", "PredictTask",
           "SamplingModel", "SuperResolve", "cascade", "check_mask", "inpaint", "interpolate", "interpolate_ddim",
           "load_mask", "mix_noised", "named_mask", "repaint", "repaint_schedule", "run_sampler", "sample_seeds",
           "seeded_noise", "side_by_side", "slerp", "start_grid", "Trajectory"]
