"""Multi-step inference with trained models, as plain functions: interpolation and inpainting."""

from diffusion_pl.pipelines.inpainting import INPAINT_METHODS, inpaint, repaint, repaint_schedule
from diffusion_pl.pipelines.interpolation import interpolate, interpolate_ddim, mix_noised, slerp
from diffusion_pl.pipelines.masks import MASK_NAMES, check_mask, load_mask, named_mask
from diffusion_pl.pipelines.model import SamplingModel, run_sampler, start_grid
from diffusion_pl.pipelines.tasks import Inpaint, Interpolate, PredictTask

__all__ = ["INPAINT_METHODS", "Inpaint", "Interpolate", "PredictTask", "MASK_NAMES", "SamplingModel", "check_mask", "inpaint", "interpolate",
           "interpolate_ddim", "load_mask", "mix_noised", "named_mask", "repaint", "repaint_schedule", "run_sampler",
           "slerp", "start_grid"]
