"""diffusion_pl: a PyTorch Lightning framework for diffusion-model research."""

__version__ = "0.1.0"
