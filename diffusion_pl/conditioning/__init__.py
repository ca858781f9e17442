"""Conditioners: a batch -> the network's keyword arguments (and the null condition of classifier-free guidance)."""

from diffusion_pl.conditioning.base import Conditioner, NetKwargs
from diffusion_pl.conditioning.class_label import ClassContext, ClassLabel
from diffusion_pl.conditioning.compose import Compose
from diffusion_pl.conditioning.low_res import LowResImage, MissingLowResError, set_sampling_level
from diffusion_pl.conditioning.text import Text

__all__ = ["ClassContext", "ClassLabel", "Compose", "Conditioner", "LowResImage", "MissingLowResError", "NetKwargs", "Text",
           "set_sampling_level"]
