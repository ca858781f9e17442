"""The wiring: self-describing checkpoints, the first-stage slot, the shared LR schedule and the HPARAMS view."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from helpers import DDPM_FASHION, REPO, run_cli, run_trainer, sample_grid, set_callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from diffusion_pl.callbacks import SampleGrid
from diffusion_pl.conditioning import ClassLabel
from diffusion_pl.core.spec import build, spec_of
from diffusion_pl.guidance import ClassifierFree
from diffusion_pl.losses import HybridLoss
from diffusion_pl.models import DiffusionModule, WarmupLR
from diffusion_pl.models.lr_schedule import warmup_multiplier
from diffusion_pl.nets import UNet
from diffusion_pl.nets.first_stage import IdentityStage, SpaceToDepth
from diffusion_pl.processes import VPSDE, DiscreteProcess
from diffusion_pl.samplers import DDIM, ODE

CFG = str(REPO / "configs" / "guidance" / "cfg_fashion_mnist.yaml")


def tiny_unet(**kwargs: object) -> UNet:
    return UNet(**{"image_size": 8, "in_channels": 1, "base_channels": 16, "channel_mult": (1, 2),
                   "num_res_blocks": 1, "attention_resolutions": (4,), "dropout": 0.0, **kwargs})


def test_parts_round_trip_through_their_specs() -> None:
    for part in (tiny_unet(num_classes=3), DiscreteProcess(50, "linear"), VPSDE(0.2, 10.0), DDIM(steps=7, eta=0.5),
                 ODE(method="rk45", rtol=1e-3), HybridLoss(vlb_weight=0.01), ClassLabel(3, 0.2), ClassifierFree(2.0),
                 SpaceToDepth(2)):
        spec = spec_of(part)
        assert spec_of(build(spec)) == spec, spec


def test_load_from_checkpoint_rebuilds_every_part_in_plain_python(tmp_path: Path) -> None:
    """No CLI, no config file: the checkpoint alone rebuilds net, process, conditioner, guidance, sampler and first
    stage, and the reloaded model samples the same images as the saved one."""
    torch.manual_seed(0)
    module = DiffusionModule(tiny_unet(num_classes=3), DiscreteProcess(50, "cosine"), sampler=DDIM(steps=5),
                             conditioner=ClassLabel(3, 0.1), guidance=[ClassifierFree(2.0)], image_size=8, channels=1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    import lightning.pytorch as pl
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = DiffusionModule.load_from_checkpoint(path, weights_only=True).eval()
    assert isinstance(restored.sampler, DDIM) and restored.sampler.steps == 5
    assert isinstance(restored.conditioner, ClassLabel) and restored.conditioner.dropout == 0.1
    assert isinstance(restored.guidance[0], ClassifierFree) and restored.guidance[0].scale == 2.0
    assert isinstance(restored.first_stage, IdentityStage) and restored.process.num_steps == 50
    batch = {"seed": torch.arange(3), "label": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        expected, got = module.eval().predict_step(batch, 0), restored.predict_step(batch, 0)
    assert torch.equal(expected["samples"], got["samples"]) and got["label"].tolist() == [0, 1, 2]


def test_space_to_depth_first_stage_runs_the_net_on_latents(tmp_path: Path) -> None:
    """With a first stage, the CLI links the net to the latent shape (4 x 4 x 4 for 1 x 8 x 8 digits and factor 2);
    training encodes, sampling decodes back to images."""
    cli = run_cli(None, DDPM_FASHION, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                  "--model.init_args.first_stage=diffusion_pl.nets.first_stage.SpaceToDepth",
                  "--model.init_args.net.init_args.attention_resolutions=[2]", "--model.init_args.sampler.steps=3",
                  root=tmp_path)
    net = cli.model.denoiser.net
    assert (net.in_channels, net.image_size) == (4, 4) and cli.model.latent_shape == (4, 4, 4)
    set_callback(cli, SampleGrid, every_n_steps=0, num_samples=2)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    images = cli.model.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())
    stage = SpaceToDepth(2)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(stage.decode(stage.encode(x)), x)
    with pytest.raises(ValueError, match="divisible by 3"):
        SpaceToDepth(3).latent_shape((1, 8, 8))


def test_warmup_schedule_is_linear_then_cosine_with_the_trainer_total() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = WarmupLR(optimizer, warmup_steps=4, decay="cosine", total_steps=20)
    lrs = []
    for _ in range(22):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    expected = [0.5 * (1 + math.cos(math.pi * (step - 4) / 16)) for step in range(4, 20)]
    assert lrs[4:20] == pytest.approx(expected) and lrs[20:] == pytest.approx([0.0, 0.0])
    assert warmup_multiplier(100, 4, "constant", 20) == 1.0


def test_every_module_fills_the_schedule_total_from_the_trainer(tmp_path: Path) -> None:
    cli = run_trainer("fit", DDPM_FASHION, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                      "--model.init_args.lr_scheduler=diffusion_pl.models.WarmupLR",
                      "--model.init_args.lr_scheduler.init_args.decay=cosine",
                      "--model.init_args.lr_scheduler.init_args.warmup_steps=0", root=tmp_path,
                      settings=sample_grid(num_samples=1))
    (scheduler,) = cli.trainer.lr_scheduler_configs
    assert scheduler.scheduler.total_steps == 3 and cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0)


def hparams_plugin(log_dir: Path) -> tuple[plugin_data_pb2.HParamsPluginData, plugin_data_pb2.HParamsPluginData]:
    """The experiment (declared hyperparameters and metrics) and the session start (values) of a run's events."""
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return experiment, session


def test_tensorboard_hparams_show_the_run_defining_parts_and_metrics(tmp_path: Path) -> None:
    cli = run_trainer("fit", CFG, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                      "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--model.init_args.sampler.steps=3",
                      root=tmp_path, settings=sample_grid(num_samples=2))
    experiment, session = hparams_plugin(Path(cli.trainer.log_dir))
    metrics = {info.name.tag for info in experiment.experiment.metric_infos}
    assert {"val/loss", "val/bpd", "val/fid"} <= metrics and "hp_metric" not in metrics
    values = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
              for name, value in session.session_start_info.hparams.items()}
    assert values["process"] == "DiscreteProcess" and values["process/schedule"] == "cosine"
    assert values["process/num_steps"] == 100 and values["parameterization"] == "Eps" and values["loss"] == "SimpleLoss"
    assert values["net/base_channels"] == 16 and values["net/channel_mult"] == "1,2"
    assert values["net/num_res_blocks"] == 1 and values["sampler"] == "DDIM" and values["sampler/steps"] == 3
    assert values["guidance/0"] == "ClassifierFree" and values["guidance/0/scale"] == 3.0
    assert values["conditioner/dropout"] == pytest.approx(0.1) and values["lr_scheduler/warmup_steps"] == 100
    assert values["base_lr"] == pytest.approx(1e-3) and values["effective_batch_size"] == 128
    assert values["ema_decay"] == pytest.approx(0.995) and values["data/source"] == "Digits"
    scalars = EventAccumulator(str(cli.trainer.log_dir))
    scalars.Reload()
    assert "val/loss" in scalars.Tags()["scalars"] and "hp_metric" not in scalars.Tags()["scalars"]


def test_classifier_module_takes_the_shared_schedule() -> None:
    from diffusion_pl.models import ClassifierModule
    from diffusion_pl.nets import EncoderClassifier

    net = EncoderClassifier(image_size=8, in_channels=1, num_classes=3, base_channels=16, channel_mult=(1,),
                            num_res_blocks=1, attention_resolutions=())
    module = ClassifierModule(net, lr_scheduler=functools.partial(WarmupLR, warmup_steps=2), image_size=8, channels=1)
    assert module.scheduler_factory.keywords == {"warmup_steps": 2}
