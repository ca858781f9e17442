"""ClassifierModule: an image classifier trained on clean images, or on noisy x_t for classifier guidance."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from diffusion_pl.core.spec import build, is_spec
from diffusion_pl.models.base import PartsModule
from diffusion_pl.models.noisy_inputs import NoisyInputs
from diffusion_pl.nets.classifier import EncoderClassifier
from diffusion_pl.processes.base import ForwardProcess

Stage = Literal["train", "val", "test"]  # the prefix of the logged metric names


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with lr 1e-3 (Loshchilov & Hutter 2019)."""
    return torch.optim.AdamW(params, lr=1e-3)


class ClassifierModule(NoisyInputs, PartsModule):
    """Cross-entropy training of an :class:`EncoderClassifier`, logging ``{train,val,test}/{loss,acc}``.

    With a ``process`` the classifier learns p(y | x_t, t) on x_t = alpha(t) x0 + sigma(t) eps, t ~
    ``process.sample_t`` (the noisy classifier of classifier guidance, Dhariwal & Nichol 2021, Sec. 4.1),
    and validation/test also log the accuracy per noise level as ``{val,test}/acc_noise_{k}`` for the
    k-th of ``noise_buckets`` equal-width buckets of sigma^2 / (alpha^2 + sigma^2). Validation and test noise
    comes from a generator seeded by the batch index, so evaluations are comparable and leave the global
    RNG untouched.

    Args:
        net: The classifier; ``net.num_classes`` sets the number of classes.
        optimizer: Optimizer factory (defaults to AdamW, lr 1e-3).
        process: Forward process whose noisy x_t the classifier is trained on; None for clean images. The
            net gets t only when it is time-conditional (else it learns a noise-level-agnostic classifier).
        noise_buckets: Number of noise-level buckets for the per-level accuracy.
        label_smoothing: Label smoothing of the cross-entropy (Szegedy et al. 2016).
        lr_scheduler: Learning-rate schedule factory, e.g. ``WarmupLR`` (default: constant).
        image_size: Side of the square images (linked from the data config; must match the net).
        channels: Image channels (linked from the data config; must match the net).
    """

    #: What the weights mean: a checkpoint of another net or process is refused (``CheckpointChecks``).
    MUST_MATCH = ("net", "process", "image_size", "channels")
    RUN_METRICS = ("val/loss", "val/acc")
    BUCKET_METRIC = "acc_noise"

    def __init__(
        self,
        net: EncoderClassifier | dict[str, Any],
        optimizer: OptimizerCallable = default_optimizer,
        process: ForwardProcess | None = None,
        noise_buckets: int = 4,
        label_smoothing: float = 0.0,
        lr_scheduler: LRSchedulerCallable | None = None,
        image_size: int = 32,
        channels: int = 3,
    ) -> None:
        super().__init__()
        if is_spec(net) or is_spec(process):  # the specs a checkpoint stores: load_from_checkpoint outside LightningCLI
            net, process = build(net, "the net argument"), build(process, "the process argument")
        if (net.image_size, net.in_channels) != (image_size, channels):
            raise ValueError(
                f"the classifier net takes {net.in_channels}x{net.image_size}x{net.image_size} images but the module "
                f"was given channels={channels}, image_size={image_size}; build both from the data config")
        self.register_parts({"net": net, "process": process}, optimizer, lr_scheduler)
        self.net = net
        self.init_noisy_inputs(process, noise_buckets, net.time_conditional)
        # ModuleDict keys get a suffix: a key "train" would shadow nn.Module.train.
        self.accuracy = torch.nn.ModuleDict({f"{stage}_acc": MulticlassAccuracy(net.num_classes, average="micro")
                                             for stage in ("train", "val", "test")})

    @property
    def trained(self) -> nn.Module:
        return self.net

    def _step(self, batch: dict[str, Any], stage: Stage, generator: torch.Generator | None) -> Tensor:
        """Loss and accuracy of one batch, logged under ``stage``."""
        inputs = self.noisy_input(batch["image"], generator)
        labels = batch["label"]
        logits = self.net(inputs.x, inputs.t if self.net.time_conditional else None)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, labels)  # forward: the batch value for step logging, accumulated for the epoch
        training = stage == "train"
        size = labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=training, sync_dist=not training, batch_size=size)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_step=training, on_epoch=not training, batch_size=size)
        self.count_correct(stage, logits.argmax(-1) == labels, inputs.noise_fraction)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train", None)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", self.evaluation_generator(batch_idx))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", self.evaluation_generator(batch_idx))
