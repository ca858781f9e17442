"""Thin LightningModules that wire nets, processes, losses and samplers together."""

from diffusion_pl.models.autoencoder import AutoencoderModule
from diffusion_pl.models.cascade import CascadeModule, CascadeStage
from diffusion_pl.models.classifier import ClassifierModule
from diffusion_pl.models.clip import CLIPModule
from diffusion_pl.models.diffusion import DiffusionModule
from diffusion_pl.models.lr_schedule import WarmupLR

__all__ = ["AutoencoderModule", "CLIPModule", "CascadeModule", "CascadeStage", "ClassifierModule", "DiffusionModule", "WarmupLR"]
