"""The command line: ``diffusion-pl fit|validate|test|predict`` (LightningCLI) and its one-screen errors."""

from diffusion_pl.cli.main import DiffusionCLI, build_cli, main

__all__ = ["DiffusionCLI", "build_cli", "main"]
