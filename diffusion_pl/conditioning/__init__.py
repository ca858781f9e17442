"""Conditioners: a batch -> the network's keyword arguments (and the null condition of classifier-free guidance)."""

from diffusion_pl.conditioning.base import Conditioner, NetKwargs
from diffusion_pl.conditioning.class_label import ClassLabel
from diffusion_pl.conditioning.compose import Compose

__all__ = ["ClassLabel", "Compose", "Conditioner", "NetKwargs"]
