"""Training speed options that leave the model and its checkpoints unchanged: torch.compile and channels-last."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch

from diffusion_pl.core.errors import ConfigError

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class TrainingSpeed(pl.Callback):
    """Compile the network and/or put it and the training images in channels-last (NHWC) memory format.

    ``nn.Module.compile`` compiles in place, so parameter names, checkpoints and EMA are those of the plain network.
    Channels-last speeds up convolutions on tensor-core GPUs (with ``precision: bf16-mixed``); on CPUs it rarely
    helps. Measure both with ``tools/benchmark_training.py``.

    Args:
        compile: Compile the network with ``torch.compile``.
        channels_last: Convert the network's weights and every training batch's ``"image"`` to channels-last.
        module: Path of the network inside the LightningModule (``get_submodule``), e.g. ``denoiser.net``.
        mode: ``torch.compile`` mode of the inductor backend (None: its default).
        backend: ``torch.compile`` backend (``inductor``; ``eager`` only traces, for tests).
    """

    def __init__(self, compile: bool = True, channels_last: bool = False, module: str = "denoiser.net",
                 mode: CompileMode | None = None, backend: str = "inductor") -> None:
        self.compile, self.channels_last = compile, channels_last
        self.module, self.mode, self.backend = module, mode, backend

    def network(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The submodule these options apply to."""
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as error:
            raise ConfigError(f"TrainingSpeed(module={self.module!r}): {type(pl_module).__name__} has no such "
                              f"submodule ({error}); give the path of its network, e.g. 'denoiser.net' for a "
                              "DiffusionModule") from error

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = self.network(pl_module)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        if self.compile:
            net.compile(backend=self.backend, **({} if self.mode is None else {"mode": self.mode}))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.channels_last and isinstance(batch, dict) and getattr(batch.get("image"), "ndim", 0) == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
