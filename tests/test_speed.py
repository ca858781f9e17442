"""Speed options are real config options that train like the plain run: torch.compile and channels-last
(``TrainingSpeed``, overlays/speed.yaml), fused Adam and bf16-mixed precision (the GPU configs)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import DDPM_FASHION, REPO, LossRecorder, run_cli, run_trainer
from torch._dynamo.utils import counters

from diffusion_pl.callbacks.speed import TrainingSpeed
from diffusion_pl.core.errors import ConfigError

GPU_CONFIGS = ["configs/ddpm/cifar10.yaml", "configs/ddpm/cifar10_improved.yaml", "configs/sde/subvp_cifar10.yaml",
               "configs/sde/ve_cifar10.yaml"]
FIT = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.callbacks=[]",
       "--trainer.enable_checkpointing=false"]


def test_compile_and_channels_last_train_like_the_plain_net(tmp_path: Path) -> None:
    plain, fast = LossRecorder(), LossRecorder()
    plain_net = run_trainer("fit", DDPM_FASHION, *FIT, root=tmp_path / "plain", callbacks=[plain]).model.denoiser.net
    counters.clear()
    speed = TrainingSpeed(compile=True, channels_last=True, backend="eager")
    net = run_trainer("fit", DDPM_FASHION, *FIT, root=tmp_path / "fast", callbacks=[fast, speed]).model.denoiser.net
    assert counters["stats"]["unique_graphs"] > 0  # the net's forward went through torch.compile
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in
                   (m.weight for m in plain_net.modules() if isinstance(m, torch.nn.Conv2d)))
    assert list(net.state_dict()) == list(plain_net.state_dict())  # checkpoints keep the plain names
    assert sorted(fast.losses) == sorted(plain.losses) == [1, 2, 3]
    for step in plain.losses:
        assert fast.losses[step] == pytest.approx(plain.losses[step], rel=1e-4)


def test_speed_overlay_is_a_real_option(tmp_path: Path) -> None:
    cli = run_cli(None, DDPM_FASHION, "--config", str(REPO / "overlays" / "speed.yaml"), root=tmp_path)
    speed = next(c for c in cli.trainer.callbacks if isinstance(c, TrainingSpeed))
    assert speed.compile and speed.channels_last and speed.module == "denoiser.net"
    with pytest.raises(ConfigError, match="denoiser.net"):
        TrainingSpeed(module="unet").network(cli.model)


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_gpu_configs_use_bf16_mixed_and_fused_adam(config: str, tmp_path: Path) -> None:
    cli = run_cli(None, config, root=tmp_path, tiny=False)
    assert cli.trainer.precision == "bf16-mixed"
    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is True


class GradNorms(pl.Callback):
    """Records the norm of the gradients each optimizer step used (after any clipping; zeroed only next step)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))


def test_bf16_mixed_fused_adam_trains_and_clips_on_cpu(tmp_path: Path) -> None:
    """Lightning's mixed-precision plugin refuses to clip for fused optimizers; DiffusionModule clips itself when
    there is no grad scaler (bf16), so the GPU configs keep Ho et al.'s clipping with fused Adam."""
    norms = GradNorms()
    cli = run_trainer("fit", "configs/ddpm/cifar10.yaml", *FIT, "--trainer.gradient_clip_val=0.001", root=tmp_path,
                      callbacks=[norms])
    assert cli.trainer.global_step == 3 and cli.trainer.optimizers[0].defaults["fused"] is True
    assert str(cli.trainer.precision) == "bf16-mixed"
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert len(norms.norms) == 3 and all(norm <= 0.001 * 1.001 for norm in norms.norms)


def test_fused_adam_steps_like_the_default_adam() -> None:
    torch.manual_seed(0)
    start = [torch.randn(5, 4), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.Adam(params, lr=1e-2, fused=fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
