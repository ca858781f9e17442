"""ClassifierModule: an image classifier trained on clean images, or on noisy x_t for classifier guidance."""

from __future__ import annotations

import logging
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from diffusion_pl.core.seeds import evaluation_seed
from diffusion_pl.core.spec import build, factory, is_spec, keep_described, spec_of
from diffusion_pl.guidance import PROCESS_MARGINALS_KEY
from diffusion_pl.models.checkpointing import CheckpointChecks
from diffusion_pl.models.hparams import log_run_hparams
from diffusion_pl.models.lr_schedule import configure_optimization
from diffusion_pl.nets.classifier import EncoderClassifier
from diffusion_pl.processes.base import ForwardProcess

log = logging.getLogger(__name__)

_NET_CLASS_PATH = f"{EncoderClassifier.__module__}.{EncoderClassifier.__qualname__}"

Stage = Literal["train", "val", "test"]  # the prefix of the logged metric names
#: The metrics shown beside the hyperparameters in TensorBoard's HPARAMS view.
RUN_METRICS = ("val/loss", "val/acc")


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with lr 1e-3 (Loshchilov & Hutter 2019)."""
    return torch.optim.AdamW(params, lr=1e-3)


class ClassifierInput(NamedTuple):
    """What the net sees: the images (noisy x_t when a process is set), the time it embeds, and the noise level.

    Attributes:
        x: Images (B, C, H, W).
        t: Network time ``process.net_input_time(t)`` (B,), or None for a clean classifier.
        noise_fraction: sigma(t)^2 / (alpha(t)^2 + sigma(t)^2) in [0, 1] (B,), or None for a clean classifier.
    """

    x: Tensor
    t: Tensor | None
    noise_fraction: Tensor | None


class BucketAccuracy(Metric):
    """Accuracy in ``num_buckets`` equal-width buckets of the noise fraction in [0, 1] (summed over DDP ranks).

    Every rank updates every bucket each step (possibly with zero counts), so the sync is collective-safe.
    """

    full_state_update = False

    def __init__(self, num_buckets: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.add_state("correct", torch.zeros(num_buckets, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_buckets, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor, noise_fraction: Tensor) -> None:
        """Count ``correct`` (bool, (B,)) predictions in the bucket of each sample's ``noise_fraction`` (B,)."""
        bucket = (noise_fraction * self.num_buckets).long().clamp(0, self.num_buckets - 1)
        self.correct += torch.bincount(bucket[correct], minlength=self.num_buckets)
        self.total += torch.bincount(bucket, minlength=self.num_buckets)

    def compute(self) -> Tensor:
        """Accuracy per bucket; NaN for a bucket without samples."""
        return self.correct.double() / self.total.double()

    def take(self, name: str) -> dict[str, Tensor]:
        """``{name}_{k}``: the accuracy of each bucket k that has samples; then reset for the next evaluation."""
        values = self.compute()
        self.reset()
        return {f"{name}_{k}": v for k, v in enumerate(values.float()) if not v.isnan()}


class ClassifierModule(CheckpointChecks, pl.LightningModule):
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
        self.save_hyperparameters(ignore=["net", "process"], logger=False)
        keep_described(self.hparams, ("optimizer", "lr_scheduler"))
        # The net as LightningCLI writes it (class_path + init_args), also when built in Python: checkpoints stay
        # loadable with weights_only=True and `ClassifierModule.load_from_checkpoint` can rebuild the net.
        self.hparams["net"] = {"class_path": _NET_CLASS_PATH, "init_args": net.config}
        self.hparams["process"] = spec_of(process)
        if (net.image_size, net.in_channels) != (image_size, channels):
            raise ValueError(
                f"the classifier net takes {net.in_channels}x{net.image_size}x{net.image_size} images but the module "
                f"was given channels={channels}, image_size={image_size}; build both from the data config")
        if noise_buckets < 1:
            raise ValueError(f"noise_buckets must be >= 1, got {noise_buckets}")
        if process is not None and not net.time_conditional:
            log.warning("training on noisy x_t with a net that does not embed t (time_conditional=False): "
                        "set time_conditional=True for a classifier-guidance classifier")
        self.net = net
        self.process = process
        self.optimizer_factory, self.scheduler_factory = factory(optimizer), factory(lr_scheduler)
        # ModuleDict keys get a suffix: a key "train" would shadow nn.Module.train.
        self.accuracy = torch.nn.ModuleDict({f"{stage}_acc": MulticlassAccuracy(net.num_classes, average="micro")
                                             for stage in ("train", "val", "test")})
        self.bucket_accuracy = None if process is None else torch.nn.ModuleDict(
            {f"{stage}_acc": BucketAccuracy(noise_buckets) for stage in ("val", "test")})
        # What the net was trained on, kept in checkpoints so a guided sampler can check it uses the same process.
        self.process_marginals: dict[str, Tensor] | None = None if process is None else process.marginals()

    def classifier_input(self, x0: Tensor, generator: torch.Generator | None = None) -> ClassifierInput:
        """The net's input for clean images ``x0``: ``x0`` itself, or x_t ~ q(x_t | x0) (Ho et al. 2020, eq. 4)
        with t ~ ``process.sample_t`` when a process is set."""
        if self.process is None:
            return ClassifierInput(x0, None, None)
        t = self.process.sample_t(x0.shape[0], x0.device, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha2, sigma2 = self.process.alpha(t) ** 2, self.process.sigma(t) ** 2
        return ClassifierInput(self.process.add_noise(x0, t, noise), self.process.net_input_time(t),
                               sigma2 / (alpha2 + sigma2))

    def _step(self, batch: dict[str, Any], stage: Stage, generator: torch.Generator | None) -> Tensor:
        """Loss and accuracy of one batch, logged under ``stage``."""
        inputs = self.classifier_input(batch["image"], generator)
        labels = batch["label"]
        logits = self.net(inputs.x, inputs.t if self.net.time_conditional else None)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, labels)  # forward: the batch value for step logging, accumulated for the epoch
        training = stage == "train"
        size = labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=training, sync_dist=not training, batch_size=size)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_step=training, on_epoch=not training, batch_size=size)
        if self.bucket_accuracy is not None and not training:
            self.bucket_accuracy[f"{stage}_acc"].update(logits.argmax(-1) == labels, inputs.noise_fraction)
        return loss

    def _eval_generator(self, batch_idx: int) -> torch.Generator:
        """Generator for evaluation noise, seeded by (batch, rank): same noise at every evaluation."""
        return torch.Generator(device=self.device).manual_seed(evaluation_seed(batch_idx, self.global_rank))

    def _log_buckets(self, stage: Stage) -> None:
        """Log (and reset) the per-noise-level accuracy of ``stage``; buckets without samples are skipped."""
        if self.bucket_accuracy is None:
            return
        self.log_dict(self.bucket_accuracy[f"{stage}_acc"].take(f"{stage}/acc_noise"), sync_dist=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train", None)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", self._eval_generator(batch_idx))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", self._eval_generator(batch_idx))

    def on_validation_epoch_end(self) -> None:
        self._log_buckets("val")

    def on_test_epoch_end(self) -> None:
        self._log_buckets("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # refuses non-finite weights
        if self.process_marginals is not None:
            checkpoint[PROCESS_MARGINALS_KEY] = self.process_marginals

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint of another net or process
        if PROCESS_MARGINALS_KEY in checkpoint:  # on the CPU whatever map_location put them on
            self.process_marginals = {k: v.cpu() for k, v in checkpoint[PROCESS_MARGINALS_KEY].items()}

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory)

    def on_fit_start(self) -> None:
        """Log the hyperparameters that define the run, beside its metrics (TensorBoard HPARAMS)."""
        log_run_hparams(self, self.net, RUN_METRICS)
